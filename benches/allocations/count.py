#!/usr/bin/env python3
"""Allocations (or instructions) per request of a tokenchat binary, counted by valgrind.

    python3 benches/allocations/count.py BINARY ROUTE        # ROUTE: health, balance or chat

Runs BINARY twice under valgrind's DHAT on a fresh SQLite database, with the same setup
(register, log in, 50 warm-up requests) and then 200 or 1,200 requests of ROUTE on one
keep-alive connection, and prints (blocks of run 2 - blocks of run 1) / 1,000: what one
request allocates, with start-up, setup and shutdown cancelled out. The chat's model is a
small OpenAI-compatible server in this script (on loopback), answering at once.

TOOL=callgrind counts instructions instead (user space only: system calls are not in it).
BARE_SETUP_WITH=<tokenchat binary> with BINARY the load bench's binary measures the bench's
bare axum server (its `bare` role) on a database that tokenchat made. LOG=<filter> sets
RUST_LOG (default info, as an operator runs it). by_site.py and by_function.py take the two
output files printed and show where the difference is, per allocation site or function.
Every request goes to loopback; the script stops the server and itself."""
import http.client, json, os, re, signal, socket, subprocess, sys, tempfile, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ANSWER = "Here is hello world in Python:\n\n```python\nprint(\"Hello, world!\")\n```\n\nSave it as hello.py and run `python hello.py`."

class Model(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": "llama3.2", "object": "model", "created": 0, "owned_by": "x"}]}).encode()
        self.send_response(200); self.send_header("content-type", "application/json"); self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_POST(self):
        n = int(self.headers.get("content-length", 0)); self.rfile.read(n)
        body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "llama3.2",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 30, "total_tokens": 50}}).encode()
        self.send_response(200); self.send_header("content-type", "application/json"); self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

TOOL = os.environ.get("TOOL", "dhat")

def run(binary, route, n, model_port):
    d = tempfile.mkdtemp(); port = free_port(); out = os.path.join(d, "dhat.out")
    env = dict(os.environ, BIND_ADDR=f"127.0.0.1:{port}", DATABASE_URL=f"sqlite://{d}/t.db",
               LLM_BASE_URL=f"http://127.0.0.1:{model_port}/v1", RUST_LOG=os.environ.get("LOG", "info"),
               LOGIN_ATTEMPTS_PER_MINUTE="0", REGISTRATIONS_PER_HOUR="0", CHAT_RATE_PER_MINUTE="0",
               INITIAL_TOKENS="1000000000000", MAX_CONNECTIONS_PER_ADDRESS="0")
    if TOOL == "callgrind":
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", binary]
    else:
        cmd = ["valgrind", "--tool=dhat", f"--dhat-out-file={out}", binary]
    if os.environ.get("BARE"):
        env["TOKENCHAT_BENCH_ROLE"] = "bare"; env["TOKENCHAT_BENCH_BARE_ADDR"] = f"127.0.0.1:{port}"
        env["TOKENCHAT_BENCH_BARE_DATABASE"] = os.environ["BARE"]
    p = subprocess.Popen(cmd, cwd=d, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        try: socket.create_connection(("127.0.0.1", port)).close(); break
        except OSError: time.sleep(0.1)
    if p.poll() is not None:
        sys.exit(f"the server stopped at start:\n{p.stderr.read()[-3000:]}")
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    def call(method, path, body=None, token=None):
        h = {"content-type": "application/json"}
        if token: h["authorization"] = f"Bearer {token}"
        c.request(method, path, body=json.dumps(body) if body is not None else None, headers=h)
        r = c.getresponse(); data = r.read(); return r.status, data
    if os.environ.get("BARE"):
        token = os.environ["BARE_TOKEN"]
    else:
        s, _ = call("POST", "/register", {"username": "alloc", "password": "alloc-password"}); assert s == 201, s
        s, data = call("POST", "/login", {"username": "alloc", "password": "alloc-password"}); token = json.loads(data)["token"]
    # warm-up: the same route a few times (pools, caches, lazily made things)
    req = {"health": ("GET", "/health", None, None), "balance": ("GET", "/balance", None, token),
           "chat": ("POST", "/chat", {"message": "code hello world in python"}, token)}[route]
    for _ in range(50):
        s, _ = call(*req); assert s == 200, s
    for _ in range(n):
        s, _ = call(*req); assert s == 200, s
    c.close(); time.sleep(0.5)
    p.send_signal(signal.SIGTERM); err = p.communicate(timeout=120)[1]
    if TOOL == "callgrind":
        m = re.search(r"Collected : (\d+)", err)
        return int(m.group(1)), 0, out
    m = re.search(r"Total:\s+([\d,]+) bytes in ([\d,]+) blocks", err)
    return int(m.group(2).replace(",", "")), int(m.group(1).replace(",", "")), out

def prepare_bare(tokenchat):
    """A database with one user and a login token, made by tokenchat, for the bare server."""
    d = tempfile.mkdtemp(); port = free_port()
    env = dict(os.environ, BIND_ADDR=f"127.0.0.1:{port}", DATABASE_URL=f"sqlite://{d}/t.db")
    p = subprocess.Popen([tokenchat], cwd=d, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try: socket.create_connection(("127.0.0.1", port)).close(); break
        except OSError: time.sleep(0.1)
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"username": "alloc", "password": "alloc-password"})
    c.request("POST", "/register", body=body, headers={"content-type": "application/json"}); c.getresponse().read()
    c.request("POST", "/login", body=body, headers={"content-type": "application/json"}); token = json.loads(c.getresponse().read())["token"]
    p.send_signal(signal.SIGTERM); p.wait()
    os.environ["BARE"] = f"sqlite://{d}/t.db"; os.environ["BARE_TOKEN"] = token

if __name__ == "__main__":
    if os.environ.get("BARE_SETUP_WITH"):
        prepare_bare(os.path.abspath(os.environ["BARE_SETUP_WITH"]))
    binary, route = os.path.abspath(sys.argv[1]), sys.argv[2]
    n1, n2 = 200, 1200
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Model); threading.Thread(target=srv.serve_forever, daemon=True).start()
    b1, by1, out1 = run(binary, route, n1, srv.server_address[1])
    b2, by2, out = run(binary, route, n2, srv.server_address[1])
    unit = "instructions" if TOOL == "callgrind" else "allocations"
    print(f"{route}: {(b2-b1)/(n2-n1):.1f} {unit}, {(by2-by1)/(n2-n1):.0f} bytes per request ({binary}; outputs {out1} {out})")

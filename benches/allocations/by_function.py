"""Instructions per request by function: by_function.py OUT1 OUT2 N [self|inc] [ROWS],
with the two callgrind outputs count.py printed (TOOL=callgrind) and N = 1000."""
import subprocess, sys, re
def load(path, inclusive):
    args = ["callgrind_annotate", "--threshold=100"] + (["--inclusive=yes"] if inclusive else []) + [path]
    out = subprocess.run(args, capture_output=True, text=True).stdout
    d = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(?:\*\s+)?(.*)$", line)
        if m:
            name = re.sub(r" \[[^\]]*\]$", "", m.group(2)).replace("???:", "")
            d[name] = d.get(name, 0) + int(m.group(1).replace(",", ""))
    return d
inc = len(sys.argv) > 4 and sys.argv[4] == "inc"
a, b, n = load(sys.argv[1], inc), load(sys.argv[2], inc), float(sys.argv[3])
rows = sorted(((b.get(k, 0) - a.get(k, 0)) / n, k) for k in set(a) | set(b))
for v, k in sorted(rows, reverse=True)[:int(sys.argv[5]) if len(sys.argv) > 5 else 40]:
    print(f"{v:9.0f} {k[:170]}")

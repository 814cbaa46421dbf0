"""Allocations per request by site: by_site.py OUT1 OUT2 N [DEPTH], with the two DHAT
outputs count.py printed and N the difference of their request counts (1000)."""
import json, sys, re
def load(path, depth):
    d = json.load(open(path)); ftbl = d["ftbl"]
    skip = re.compile(r"malloc|calloc|realloc|alloc::alloc|__rust_|__rdl|RawVec|raw_vec|alloc::vec::Vec<T,A>::|exchange_malloc|Box<T>::new|<alloc::|core::ptr|hashbrown|with_capacity|reserve|grow|finish_grow|do_reserve|alloc::string|alloc::fmt|core::fmt|String as core::fmt|to_owned|to_vec|::clone|Clone>::clone|memalign")
    agg = {}
    for pp in d["pps"]:
        names = []
        for i in pp["fs"][1:]:
            n = re.sub(r"^0x[0-9A-F]+: ", "", ftbl[i]); n = re.sub(r" \(in .*\)$", "", n)
            if not skip.search(n): names.append(n[:120])
            if len(names) >= depth: break
        k = " <- ".join(names); agg[k] = agg.get(k, 0) + pp["tbk"]
    return agg
depth = int(sys.argv[4]) if len(sys.argv) > 4 else 2
a, b = load(sys.argv[1], depth), load(sys.argv[2], depth); n = float(sys.argv[3])
rows = sorted(((b.get(k, 0) - a.get(k, 0)) / n, k) for k in set(a) | set(b))
rows = [r for r in rows if abs(r[0]) >= 0.05]
print(f"total {sum(r[0] for r in rows):.1f}")
for v, k in sorted(rows, reverse=True): print(f"{v:6.2f} {k}")

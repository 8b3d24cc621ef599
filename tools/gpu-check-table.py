#!/usr/bin/env python3
"""gpu-check-table.py: the side-by-side table of tools/gpu-check's attention
rows: kvrt, its cuBLAS dense baseline (kvrt-bench's "baseline_ms") and
PyTorch's SDPA (bench/torch_ref.py), joined on op, query heads, batch,
context (keys per sequence) and new tokens. Times are milliseconds per
layer (kvrt-bench times a step over "layers" layers); "vs" columns are the
other's time over kvrt's (> 1: kvrt faster).

  gpu-check-table.py JSONL TABLE_MD SECTION_MD DEVICE DATE COMMIT COMMAND

Writes TABLE_MD (the table), SECTION_MD (the table under a heading naming
the device, date, commit and command, for bench/RESULTS.md) and prints the
table.
"""

import json
import sys


def key(r):
    s = r.get("shape", {})
    return (r["op"], s.get("q_heads"), s.get("batch"), s.get("context"), s.get("new_tokens"))


def shape_text(r):
    s = r.get("shape", {})
    if "latent_dim" in s:
        head = "%dq %d+%d" % (s["q_heads"], s["latent_dim"], s["rope_dim"])
    else:
        head = "%dq/%dkv d%d" % (s.get("q_heads", 0), s.get("kv_heads", 0), s.get("head_dim", 0))
    return "%s b%d ctx %d new %d %s" % (head, s.get("batch", 0), s.get("context", 0),
                                        s.get("new_tokens", 0), r.get("dtype", ""))


def ms(v):
    return "%.4f" % v if v is not None else "-"


def ratio(other, kvrt):
    return "%.2f" % (other / kvrt) if other is not None and kvrt else "-"


def main(argv):
    if len(argv) != 8:
        print(__doc__, file=sys.stderr)
        return 2
    jsonl, table_md, section_md, device, date, commit, command = argv[1:]
    kvrt, torch_auto, torch_flash, order, sim, notes = {}, {}, {}, [], False, set()
    for line in open(jsonl):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if not str(r.get("op", "")).startswith("attention") or "median_ms" not in r:
            if r.get("backend") == "torch" and "skip" in r:
                notes.add("torch_ref.py skipped %s %s: %s" % (r["op"], shape_text(r), r["skip"]))
            continue
        k = key(r)
        if k not in order:
            order.append(k)
        if r.get("backend") == "torch":
            if r.get("sdpa") == "auto":
                torch_auto[k] = r
            elif r.get("sdpa") == "flash" or r.get("sdpa_backend") == "flash":
                torch_flash[k] = r
            if r.get("sdpa") == "auto" and r.get("sdpa_backend") == "flash":
                torch_flash[k] = r
        else:
            kvrt[k] = r
            sim = sim or bool(r.get("sim"))
            if r.get("baseline_note"):
                notes.add("%s rows: %s" % (r.get("backend"), r["baseline_note"]))
    rows = ["| op | shape | kvrt ms | kvrt fraction | cuBLAS ms | vs cuBLAS | SDPA ms (backend) "
            "| vs SDPA | flash ms | vs flash |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for k in order:
        r = kvrt.get(k)
        t, f = torch_auto.get(k), torch_flash.get(k)
        any_row = r or t or f
        layers = r["shape"].get("layers", 1) if r else 1
        k_ms = r["median_ms"] / layers if r else None
        b_ms = r["baseline_ms"] / layers if r and r.get("baseline_ms") is not None else None
        t_ms = t["median_ms"] if t else None
        f_ms = f["median_ms"] if f else None
        rows.append("| %s | %s | %s | %s | %s | %s | %s%s | %s | %s | %s |" % (
            k[0], shape_text(any_row), ms(k_ms), "%.3f" % r["fraction"] if r else "-", ms(b_ms),
            ratio(b_ms, k_ms), ms(t_ms), " (%s)" % t.get("sdpa_backend") if t else "",
            ratio(t_ms, k_ms), ms(f_ms), ratio(f_ms, k_ms)))
    if not torch_auto:
        notes.add("no PyTorch rows: torch_ref.py found no torch or no GPU (a skip)")
    if sim:
        notes.add("kvrt-sim rows: the times are a CPU simulator's, no GPU's speed figures; "
                  "the rows show that the bench, the baseline and its check run end to end")
    table = "\n".join(rows) + "\n"
    if notes:
        table += "\n" + "\n".join("- " + n for n in sorted(notes)) + "\n"
    with open(table_md, "w") as fh:
        fh.write(table)
    with open(section_md, "w") as fh:
        fh.write("## Attention: kvrt vs cuBLAS vs PyTorch SDPA (%s, %s)\n\n" % (device, date))
        fh.write("Commit %s; `%s`. Milliseconds per layer, medians; vs columns are the "
                 "other's time over kvrt's (> 1: kvrt faster); fraction is kvrt's GB/s over "
                 "a device copy measured in the same run.\n\n" % (commit, command))
        fh.write(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

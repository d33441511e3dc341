"""Plain-text tables shared by the benchmark scripts."""


def metric_table(rows, column_key: str, specs) -> str:
  """One line per metric, one column per row: ``specs`` is ``[(key, format), ...]``."""
  table = [["metric"] + [r[column_key] for r in rows]]
  table += [[key] + [fmt.format(r[key]) for r in rows] for key, fmt in specs]
  widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
  fmt_line = lambda cells: " | ".join(
      [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])])
  lines = [fmt_line(line) for line in table]
  lines.insert(1, "-+-".join("-" * w for w in widths))
  return "\n".join(lines)


def finish(result: dict, table_text: str, out: str | None) -> dict:
  """Prints the table and the run's load and duration; writes ``result`` as JSON to ``out``."""
  import json  # pylint: disable=import-outside-toplevel
  print(table_text)
  machine = result.get("machine", {})
  load = ""
  if "loadavg_before" in machine:
    load = (f"load average before/after: {machine['loadavg_before'][0]:.2f} / "
            f"{machine['loadavg_after'][0]:.2f}; ")
  print(f"{load}total {result['total_s']:.0f} s")
  if out:
    with open(out, "w") as f:
      json.dump(result, f, indent=2)
  return result

"""The benchmark's outputs: OUT/step_benchmark.json, OUT/step_benchmark.png and a markdown
table (with the kivfm / torch speed ratio per shape) for the README."""
from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

COLORS = {'kivfm': 'tab:blue', 'torch': 'tab:orange', 'torch.compile': 'tab:green'}


def write_json(path: str, results: dict) -> None:
  with open(path, 'w') as f:
    json.dump(results, f, indent=1)


def _fmt(x, spec: str, scale: float = 1.0) -> str:
  return '-' if x is None else format(x / scale, spec)


def table(results: dict) -> str:
  """Markdown: one row per measured variant, then the kivfm / torch ratio per compared shape."""
  m = results['matmul_peak']
  chip = (f'; {results["machine"]["device_kind"]} peak {m["chip"] / 1e12:.0f} TFLOP/s '
          '(chip_utilization in the JSON)') if m.get('chip') else ''
  lines = [f'Measured dense {m["dtype"]} matmul peak (best of the run\'s start and end): '
           f'{m["peak"] / 1e9:.0f} GFLOP/s (jax {m["jax"] / 1e9:.0f}, torch '
           f'{m.get("torch", 0) / 1e9:.0f}){chip}.', '',
           '| group | variant | B | px | step s, median [min-max] | CPU s/step | images/s '
           '| GFLOP/image | GFLOP/s (util.) | peak RSS MB (+step) | XLA temp MB | first call s |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for v in results['variants']:
    head = f'| {v["group"]} | {v["name"]} | {v["batch"]} | {v["size"]} |'
    if 'skipped' in v:
      lines.append(f'{head} skipped: {v["skipped"]} | | | | | | | |')
      continue
    s = v['summary']
    rate = (f'{v["flops_per_s"] / 1e9:.3g} ({v["utilization"]:.0%})' if 'flops_per_s' in v
            else '-')
    lines.append(
        f'{head} {s["step_s"]:.2f} [{s["step_s_min"]:.2f}-{s["step_s_max"]:.2f}] | '
        f'{s["cpu_s"]:.2f} | {s["images_per_s"]:.2f} | '
        f'{_fmt(v.get("flops_per_image"), ".3g", 1e9)} | {rate} | '
        f'{v["peak_rss_mb"]:.0f} (+{v["step_rss_growth_mb"]:.0f}) | '
        f'{_fmt(v.get("xla_temp_mb"), ".0f")} | {v["first_call_s"]:.1f} |')
  lines += ['', 'FLOPs: XLA cost analysis of kivfm\'s compiled step (torch rows: that of kivfm '
            'at the same shape); util. = achieved FLOP/s at the median step / measured matmul '
            'peak. CPU s/step: process CPU time of a step, all threads. +step: peak RSS during '
            'the steps minus RSS before them (freed memory returned to the OS first); XLA temp: '
            'the temporary buffers XLA plans for kivfm\'s step.']
  for v in results['variants']:
    if v.get('torch_counted_flops_per_image'):
      lines.append(f'torch.utils.flop_counter on the peer at {v["size"]}px: '
                   f'{v["torch_counted_flops_per_image"] / 1e9:.3g} GFLOP/image '
                   '(matmuls, convolutions, attention only).')
  lines.append('')
  for shape, (median, best) in ratios(results).items():
    lines.append(f'kivfm / {shape}: {median:.2f}x images/s at the median step, {best:.2f}x at '
                 'the best')
  return '\n'.join(lines)


def ratios(results: dict) -> dict:
  """'torch fp32 at B32 112px' -> (median, best): kivfm's images/s over that contender's, per
  compared shape, from median and from best step times."""
  out = {}
  for group in {v['group'] for v in results['variants'] if v['group'].startswith('compare')}:
    rows = {v['framework']: v for v in results['variants']
            if v['group'] == group and 'skipped' not in v}
    if 'kivfm' not in rows:
      continue
    ours = rows['kivfm']['summary']
    for framework, row in rows.items():
      if framework != 'kivfm':
        theirs = row['summary']
        out[f'{row["name"]} at B{row["batch"]} {row["size"]}px'] = (
            theirs['step_s'] / ours['step_s'], theirs['step_s_min'] / ours['step_s_min'])
  return dict(sorted(out.items()))


def _whiskers(rows: list[dict]) -> tuple[list, list]:
  mid = [r['summary']['images_per_s'] for r in rows]
  err = [[m - r['summary']['images_per_s_min'] for m, r in zip(mid, rows)],
         [r['summary']['images_per_s_max'] - m for m, r in zip(mid, rows)]]
  return mid, err


def plot(path: str, results: dict) -> None:
  """Bars of images/s (min-max whiskers) for the comparisons and kivfm's options; lines for
  the batch and resolution scaling."""
  measured = [v for v in results['variants'] if 'skipped' not in v]
  by_group = lambda prefix: [v for v in measured if v['group'].startswith(prefix)]
  fig, axes = plt.subplots(2, 2, figsize=(13, 9))

  ax = axes[0, 0]
  rows = by_group('compare')
  mid, err = _whiskers(rows)
  ax.bar(range(len(rows)), mid, yerr=err, capsize=4,
         color=[COLORS.get(r['framework'], 'gray') for r in rows])
  ax.set_xticks(range(len(rows)),
                [f'{r["framework"]}\nB{r["batch"]} {r["size"]}px' for r in rows], fontsize=8)
  ax.set_title('kivfm vs PyTorch peer (same algorithm)')

  ax = axes[0, 1]
  rows = by_group('options')
  mid, err = _whiskers(rows)
  ax.bar(range(len(rows)), mid, yerr=err, capsize=4, color='tab:blue')
  ax.set_xticks(range(len(rows)), [r['name'].replace(' ', '\n', 1) for r in rows], fontsize=8)
  ax.set_title('kivfm options' + (f' (B{rows[0]["batch"]} {rows[0]["size"]}px)' if rows else ''))

  for ax, group, key, label in ((axes[1, 0], 'batch', 'batch', 'batch size'),
                                (axes[1, 1], 'resolution', 'size', 'image side (px)')):
    rows = sorted(by_group(group), key=lambda r: r[key])
    mid, err = _whiskers(rows)
    ax.errorbar([r[key] for r in rows], mid, yerr=err, marker='o', capsize=4)
    ax.set_xlabel(label)
    ax.set_title(f'kivfm scaling with {label}')
  for ax in axes.flat:
    ax.set_ylabel('images/s')
    ax.grid(alpha=0.3)
  m = results['machine']
  fig.suptitle(f'kivfm train step, {m["backend"]} ({m["cpu"]}, {m["cores"]} cores), '
               f'{m["date"][:10]}', fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(out_dir: str, results: dict) -> str:
  """Writes the JSON and the PNG into `out_dir`; returns the markdown table."""
  os.makedirs(out_dir, exist_ok=True)
  write_json(os.path.join(out_dir, 'step_benchmark.json'), results)
  plot(os.path.join(out_dir, 'step_benchmark.png'), results)
  return table(results)

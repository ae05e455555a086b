"""Regenerate the figures of BENCHMARKS.md from the latest line of each bench/results/<name>.jsonl,
so figures are never typed in: the text between the `figures` markers is replaced.

    .venv/bin/python bench/report.py [--check]   (--check: exit 1 when BENCHMARKS.md is out of date)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DOC = REPO / "BENCHMARKS.md"
START, END = "<!-- figures:start (bench/report.py) -->", "<!-- figures:end -->"

# The issue-7 targets: (benchmark, what, summary key, "min" or "max" bound, bound).
TARGETS = [
    ("bench_train", "hetlm trainer tokens/s >= 1.5x the tuned HF Trainer (group_by_length), tiny and small presets (the lower)",
     "speedup_over_tuned_hf_min", "min", 1.5),
    ("hetlm_epoch", "HeTLM epoch <= 1.5x a single-LM epoch (exact, faster of the two NLL passes)", "exact_x_single", "max", 1.5),
    ("hetlm_epoch", "HeTLM epoch <= 1.5x a single-LM epoch (actor_rows approximation)", "approx_x_single", "max", 1.5),
    ("bench_serve", "load test: no request failed", "all_requests_ok", "min", True),
    ("bench_serve", "load test with poisoned requests mixed in (--poison-every): each answered 4xx", "poisoned_requests_all_4xx", "min", True),
    ("bench_serve_attack", "load test beside 300 slow-body clients and heavy requests: light p99 within 2x of alone",
     "light_p99_attacked_over_alone", "max", 2.0),
    ("bench_serve_attack", "load test beside attackers: no light request failed", "light_failed_attacked", "max", 0),
    ("bench_serve_attack", "load test beside attackers: the server never out of file descriptors (limit 256)",
     "server_out_of_files_errors", "max", 0),
    ("bench_heavy_user", "one heavy user (10k -> 1M events): prepare peak memory grows no faster than the events", "memory_growth_over_events_growth", "max", 1.0),
    ("bench_generate", "batched constrained decoder faster than one user at a time", "speedup_over_one_at_a_time", "min", 1.0),
    ("bench_generate", "the set decoder's time per user within 3x greedy's (default settings)", "set_decoder_time_over_greedy", "max", 3.0),
    ("bench_generate", "batched constrained decoder faster than batched HF generate (left padding, same constraint)",
     "speedup_over_batched_generate", "min", 1.0),
    ("bench_generate", "page constraint costs nothing vs unconstrained batched generate", "speedup_over_batched_unconstrained", "min", 1.0),
    ("bench_prepare", "hetlm prepare faster than pandas", "speedup_hetlm_over_pandas", "min", 1.0),
    ("bench_inference", "clusterwise / larger-LM inference time <= paper's 0.39 (predict: routing, generation, scoring)", "inference_time_ratio_clusterwise_over_larger", "max", 0.39),
    ("bench_inference", "the same, end to end (loading from disk and embedding test users included)", "end_to_end_ratio_clusterwise_over_larger", "max", 0.39),
    ("bench_scale", "partitioned prepare: samples equal to in memory", "slice_samples_equal", "min", True),
    ("bench_score", "partitioned score: rows equal to in memory", "rows_equal_partitioned_vs_in_memory", "min", True),
    ("bench_ingest", "partitioned prepare of GA4 and Adobe exports: samples equal to in memory",
     "partitioned_same_samples_all", "min", True),
    ("bench_score", "partitioned score memory flat: peak above the loaded model <= 1.25x the smallest log's, the log 4x",
     "partitioned_peak_above_model_full_over_smallest", "max", 1.25),
    ("gpu_check", "GPU check (bench/gpu_check.sh) within 8 minutes on a GPU", "within_8_min", "min", True),
    # issue 15: HeTLM's clusters survive at (1, 0) and K shrinks at (5, 9), as the paper's Table 17 reports
    ("hetlm_variants", "HeTLM a=1 b=0 on Taobao keeps >= 4 clusters", "taobao_a1_b0_K", "min", 4),
    ("hetlm_variants", "HeTLM a=1 b=0 on Taobao: no cluster above 60 % of the users", "taobao_a1_b0_largest_share", "max", 0.6),
    ("hetlm_variants", "HeTLM a=5 b=9 on Taobao shrinks K (6 -> at most 5)", "taobao_a5_b9_K", "max", 5),
    ("hetlm_variants", "HeTLM on the planted log: ARI >= 0.9 for each of the paper's (alpha, beta)",
     "planted_min_ARI_paper_pairs", "min", 0.9),
]


def latest_per_log(name: str) -> dict[str, dict]:
    """The latest line of results/<name>.jsonl for each log (benchmarks that write one line per log)."""
    path = RESULTS / f"{name}.jsonl"
    found = {}
    for line in (path.read_text().splitlines() if path.exists() else []):
        if line.strip():
            result = json.loads(line)
            found[result["settings"]["log"]] = result
    return found


QUALITY_COLUMNS = ["model", "kind", "HR", "IoA", "IoP", "IoU", "F1-Cart/Purchase", "Recall@1", "Recall@10", "NDCG@10",
                   "MRR", "AUC-cart", "AUC-purchase", "Brier-cart", "Brier-purchase"]


def quality_section(per_log: dict[str, dict]) -> str:
    """QUALITY: per log, every LM decoder and baseline, and whether the best hetlm row beats the best baseline."""
    out = ["## QUALITY: next-session predictions against the strongest baselines (bench/quality.py)\n",
           "Per log: the tiny LM early-stopped on validation next-session NLL, decoded greedily (the paper's "
           "decoding) and by the set decoder (`· set decoder`); the heuristic baselines; outcome models. "
           "'beaten' compares the best hetlm row with the best baseline row of each metric.\n",
           ]
    judged = list(dict.fromkeys(k for r in per_log.values() for k in r["summary"].get("verdicts", {})))
    out += ["| log | " + " | ".join(judged) + " |", "|---|" + "---|" * len(judged)]
    for log, result in per_log.items():
        verdicts = result["summary"].get("verdicts", {})
        cells = []
        for metric in judged:
            v = verdicts.get(metric)
            cells.append("-" if not v or v["beaten"] is None else
                         ("yes" if v["beaten"] else f"**not beaten** ({fmt(v['gap'])})"))
        out.append(f"| {log} | " + " | ".join(cells) + " |")
    for log, result in per_log.items():
        settings, m = result["settings"], result["machine"]
        out.append(f"\n### QUALITY {log}\n")
        if "not_measured" in settings:
            out.append(f"Not measured: {settings['not_measured']}\n")
            continue
        out.append(f"{result['time']}, {m['cpu']}, {m['cores']} cores, load {fmt(m['load_avg_1m'])}, git {m['git']}; "
                   f"source {settings['source']}, split {settings['split']}, subsample: {settings['subsample']}, "
                   f"{settings['users']} users, {settings['pages']} pages, samples {fmt(settings['samples'])}; "
                   f"{settings['preset']} LM, pretrain {fmt(settings['pretrain'])}; set decoder "
                   f"{fmt(settings.get('set_decoder'))}; {fmt(settings['seconds'])} s in all.\n")
        out += ["| " + " | ".join(QUALITY_COLUMNS) + " |", "|" + "---|" * len(QUALITY_COLUMNS)]
        out += ["| " + " | ".join("" if row.get(c) is None else fmt(row[c]) for c in QUALITY_COLUMNS) + " |"
                for row in result["rows"]]
        out.append("")
        for metric, v in result["summary"].get("verdicts", {}).items():
            if v["beaten"] is None:
                continue
            out.append(f"- {metric}: best hetlm **{v['hetlm']}** {fmt(v['hetlm_value'])} vs best baseline "
                       f"**{v['baseline']}** {fmt(v['baseline_value'])}: "
                       + ("beaten" if v["beaten"] else f"**not beaten** (gap {fmt(v['gap'])})"))
    return "\n".join(out)


PER_LOG = {"quality": quality_section}  # benchmarks with one line per log, rendered by their own section


# The PEERS section: RecBole peers (bench_peers -> peers.jsonl) beside hetlm's rows on the same logs
# (bench/quality.py -> quality.jsonl, one line per log named by settings["log"]: rows with "model", "kind"
# and hetlm.metrics names; "baseline" rows are shown but are not hetlm's for the targets).
PEERS_COLUMNS = ["Recall@1", "Recall@10", "NDCG@10", "MRR", "HR", "IoU"]
PEERS_TARGETS = ["Recall@10", "NDCG@10", "IoU"]
PEERS_BEAT = {"IoU"}  # strictly better; the others at least equal


def latest() -> dict[str, dict]:
    found = {}
    for path in sorted(RESULTS.glob("*.jsonl")):
        if path.stem in PER_LOG:
            continue
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if lines:
            found[path.stem] = json.loads(lines[-1])
    return found


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {fmt(v)}" for k, v in value.items())
    return str(value)


def figures(results: dict[str, dict]) -> str:
    out = ["### Targets\n", "| target | figure | met |", "|---|---|---|"]
    for bench, what, key, bound, limit in TARGETS:
        summary = results.get(bench, {}).get("summary", {})
        if key not in summary:
            out.append(f"| {what} | not measured ({bench}: no `{key}`) | - |")
            continue
        value = summary[key]
        met = value >= limit if bound == "min" else value <= limit
        out.append(f"| {what} | {fmt(value)} ({bench}) | {'met' if met else '**not met**'} |")
    if "peers" in results:
        out.append(peers_section(results["peers"], quality_rows()))
    for name, result in results.items():
        if name == "peers":
            continue
        m = result["machine"]
        out += [f"\n### {name}\n", (f"{result['time']}, {m['cpu']}, {m['cores']} cores, torch threads "
                                     f"{m['torch_threads']}, load {fmt(m['load_avg_1m'])}, git {m['git']}; "
                                     f"settings: {fmt(result['settings'])}\n")]
        rows = result["rows"]
        if rows:
            out += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            out += ["| " + " | ".join(fmt(v) for v in row.values()) + " |" for row in rows]
        out += [""] + [f"- {key}: {fmt(value)}" for key, value in result["summary"].items()]
    for name, section in PER_LOG.items():
        per_log = latest_per_log(name)
        if per_log:
            out += ["", section(per_log)]
    return "\n".join(out)


def quality_rows() -> dict[str, list[dict]]:
    """Per log, the rows with a ranking or set figure of the latest quality.jsonl line of that log."""
    return {log: rows for log, result in latest_per_log("quality").items()
            if (rows := [row for row in result.get("rows", []) if any(_number(row.get(c)) for c in PEERS_COLUMNS)])}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and value == value  # not None, not NaN


def _is_hetlm(row: dict) -> bool:
    return row.get("kind") != "baseline"


def _quality_label(row: dict) -> str:
    return f"hetlm {row.get('model', '?')}" if _is_hetlm(row) else str(row.get("model", "?"))


def _cell(row: dict, key: str) -> str:
    return fmt(row[key]) if _number(row.get(key)) else "-"


def _interval(paired: dict | None) -> str:
    if not paired:
        return "-"
    return f"{paired['gap']:+.4f} [{paired['lo']:+.4f}, {paired['hi']:+.4f}]"


def peers_section(peers: dict, hetlm_rows: dict[str, list[dict]]) -> str:
    m, settings = peers["machine"], peers["settings"]
    out = ["\n### PEERS: RecBole sequential recommenders beside hetlm\n",
           f"{peers['time']}, {m['cpu']}, {m['cores']} cores (shared), git {m['git']}. Each peer: RecBole "
           f"{settings['peers'][next(iter(settings['peers']))]['versions']['recbole']}, trained on the log's training "
           f"samples (each user's latest sample flattened, every prefix -> its next page, last 50 pages), "
           f"{settings['torch_threads']} torch thread, at most {fmt(settings['max_cpu_seconds'])} CPU seconds of "
           "training (a CPU cap, as the cores are shared: wall seconds beside it), early stopping on the val "
           "samples' first-page NDCG@10, the best validation state tested; epochs: started (the last one cut "
           "by the cap) and the best. "
           "Ranking: the test samples' first next page, full ranking over the page vocabulary, [UNK] first pages "
           f"left out (hetlm.metrics.ranking_metrics). Sets: the peer's top-m pages, m (1..{settings['max_m']}) "
           "with the best val IoU, scored with the paper's set metrics. hetlm rows: bench/results/quality.jsonl.\n"]
    out += [f"- {name}: {fmt({k: v for k, v in s.items() if k != 'versions'})}" for name, s in settings["peers"].items()]
    targets = []
    for log, description in settings["logs"].items():
        peer_rows = [r for r in peers["rows"] if r["log"] == log]
        ours = hetlm_rows.get(log, [])
        out += [f"\n#### {log}: {description}\n",
                "| model | " + " | ".join(PEERS_COLUMNS) + " | top-m | train CPU s | train wall s | epochs (best) | stopped |",
                "|---|" + "---:|" * (len(PEERS_COLUMNS) + 5)]
        out += [f"| {_quality_label(row)} | " + " | ".join(_cell(row, c) for c in PEERS_COLUMNS)
                + " | - | - | - | - | - |" for row in ours]
        if not ours:
            out.append("| hetlm | pending (no rows of this log in bench/results/quality.jsonl) |" + " |" * (len(PEERS_COLUMNS) + 4))
        out += [f"| RecBole {r['peer']} | " + " | ".join(_cell(r, c) for c in PEERS_COLUMNS)
                + f" | {r['m']} | {r['train_cpu_s']:.0f} | {r['train_s']:.0f} | {r['epochs']} ({r['best_epoch'] + 1}) | {r['stopped']} |"
                for r in peer_rows]
        for metric in PEERS_TARGETS:
            best_peer = max(peer_rows, key=lambda r: r[metric])
            lms = [row for row in ours if _number(row.get(metric)) and _is_hetlm(row)]
            if not lms:
                targets.append(f"| {log} | {metric} | pending | {fmt(best_peer[metric])} ({best_peer['peer']}) | pending | - |")
                continue
            best = max(lms, key=lambda row: row[metric])
            gap = best[metric] - best_peer[metric]
            met = gap > 0 if metric in PEERS_BEAT else gap >= 0
            targets.append(f"| {log} | {metric} | {fmt(best[metric])} ({best.get('model', '?')}) | "
                           f"{fmt(best_peer[metric])} ({best_peer['peer']}) | "
                           f"{'met' if met else f'**not met** (gap {fmt(-gap)})'} | "
                           f"{_interval(best_peer.get('paired', {}).get(best.get('model'), {}).get(metric))} |")
    out += ["\n#### Target: the best hetlm model matches the best peer on the first page's ranking, and beats "
            "every peer's top-m set on IoU\n",
            "Paired 95% interval: of the per-user difference (best hetlm row - best peer) over the same test users, "
            f"{settings.get('bootstrap', '?')} bootstrap resamples of users; an interval across 0 is a difference "
            "these test users cannot tell from chance.\n",
            "| log | metric | best hetlm | best peer | met | paired 95% interval |", "|---|---|---|---|---|---|",
            *targets]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    doc = DOC.read_text()
    if START not in doc or END not in doc:
        sys.exit(f"{DOC}: the markers {START!r} and {END!r} are missing")
    before, rest = doc.split(START, 1)
    after = rest.split(END, 1)[1]
    updated = f"{before}{START}\n{figures(latest())}\n{END}{after}"
    if args.check:
        sys.exit(0 if updated == doc else 1)
    DOC.write_text(updated)


if __name__ == "__main__":
    main()

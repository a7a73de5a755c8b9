"""Abliteration: `posttrain abliterate` vs heretic (`heretic-llm`) on the same refusal model.

    python benchmarks/abliterate.py --heretic-python /tmp/heretic/bin/python
    python benchmarks/abliterate.py --quick ...   # 20 heretic trials, 100 world rows
    python benchmarks/abliterate.py --write ...   # also rewrites the benchmarks/README.md section

heretic is AGPL: it is never imported or copied here, only run as a program from its own
virtual environment (`python3.11 -m venv /tmp/heretic && /tmp/heretic/bin/pip install
torch==2.13.0 heretic-llm`), so `--heretic-python` names that interpreter.

What runs, in `--work` (default runs/bench-abliterate):
1. the tiny world's data (`write_world_data`, seed 0) and, unless `--model` is given, the
   refusal model of `evidence/abliteration.py`: full SFT of the shipped base on the world's
   chat tasks together with its refusal set (it answers tasks and refuses harmful requests);
2. the prompt parts our command uses (`steer.cli.prompt_sets` with the world's harmful/harmless
   train and test files): train (directions), validation (selection), held-out test
   (evaluation). heretic gets the same train parts as its `good/bad_prompts` and the same
   validation parts as its `good/bad_evaluation_prompts`, as one-prompt-per-line text files;
3. ours: `posttrain abliterate MODEL projected=true harmful=... harmless=... harmful_test=...
   harmless_test=...` in a fresh process, wall clock from start to exit (its own before/after
   evaluation included); `--ours-variant 'norm_preserving=true'` adds a row per variant;
4. heretic: `heretic` in a fresh process with a `config.toml` (local model, local prompt
   files, `system_prompt = ""`, `batch_size`, `n_trials`, `seed`, `export_strategy = merge`),
   wall clock from start to exit (saving included). Its end menu is driven through stdin
   (heretic reads plain `input()` menus when KAGGLE_KERNEL_RUN_TYPE is set): from its Pareto
   front we save (a) the trial with the fewest validation refusals (ties: lowest KL) and (b)
   the trial with the fewest refusals among those with heretic's own validation KL (its
   KL(original || edited)) <= `--kl-limit` (our command's `kl_limit` default), then exit;
   both tools get the same threads (`--threads`, default 1) and OMP_WAIT_POLICY=PASSIVE;
5. one evaluation for every model, `steer.evaluation.measure` with the original model's
   tokenizer, the held-out test prompts, the original's first-token logits on harmless test
   prompts (KL(edited || original), first token) and the refusal first tokens of the original
   (`refusal_first_tokens` on the validation harmful prompts), plus tiny-world accuracy and
   perplexity on `--world-limit` rows.

heretic always sends a system message; the tiny world's ChatML template renders even an
empty one, which the refusal model never saw. heretic's copy of the model therefore gets the
same template behind a filter that drops empty messages, so both tools see byte-identical
prompts (checked before heretic starts).

Simplified on purpose: one run per tool (no repeats; the machine's load is recorded), CPU,
heretic's own hyper-parameter search left as it is apart from the trial count and seed.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OURS = "import sys; from posttrain.cli import main; sys.exit(main(['abliterate', *sys.argv[1:]]))"
EMPTY_MESSAGE_FILTER = (
    "{%- set messages = messages | rejectattr('content', 'equalto', '') | list -%}"
)
FRONT_ROW = re.compile(
    r"\[(\d+)\] \[Trial\s+(\d+)\] Refusals:\s*(\d+)/(\d+), KL divergence: ([\d.]+)"
)
SECTION = "Abliteration: posttrain abliterate vs heretic (CPU)"


# ----------------------------------------------------------------------------- inputs


def refusal_model(work: Path, model: str | None) -> str:
    """The model both tools edit: `model`, or evidence/abliteration.py's chat + refusal SFT."""
    if model:
        return model
    sys.path.insert(0, str(ROOT / "evidence"))
    from abliteration import refusal_model as train_refusal_model

    return train_refusal_model(work)


def world_files(world: Path) -> dict[str, str]:
    """The four prompt files both tools start from, as our command's keys."""
    return {key: str(world / f"{key}.jsonl") for key in
            ("harmful_train", "harmless_train", "harmful_test", "harmless_test")}  # fmt: skip


def prompt_parts(files: dict[str, str], seed: int, prompts_dir: Path) -> dict[str, list[str]]:
    """Our command's train/val/test parts, also written as text files for heretic."""
    from posttrain.steer.cli import AbliterateConfig, prompt_sets

    cfg = AbliterateConfig(model="-", harmful=files["harmful_train"],
                           harmless=files["harmless_train"], harmful_test=files["harmful_test"],
                           harmless_test=files["harmless_test"], seed=seed)  # fmt: skip
    sets, _ = prompt_sets(cfg, str(prompts_dir))
    prompts_dir.mkdir(parents=True, exist_ok=True)
    for name, prompts in sets.items():
        if not all(isinstance(p, str) and "\n" not in p for p in prompts):
            raise SystemExit(f"{name}: heretic reads one prompt per line; multi-line prompts")
        (prompts_dir / f"{name}.txt").write_text("\n".join(prompts) + "\n")
    return sets


def heretic_model_copy(model_dir: str, dest: Path) -> str:
    """A copy of the model folder whose chat template drops empty (system) messages."""
    from transformers import AutoTokenizer

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(model_dir, dest)
    tok = AutoTokenizer.from_pretrained(str(dest))
    tok.chat_template = EMPTY_MESSAGE_FILTER + tok.chat_template
    tok.save_pretrained(str(dest))
    user = [{"role": "user", "content": "hello"}]
    with_system = [{"role": "system", "content": ""}, *user]
    render = AutoTokenizer.from_pretrained(str(dest)).apply_chat_template
    original = AutoTokenizer.from_pretrained(model_dir).apply_chat_template
    same = render(with_system, add_generation_prompt=True, tokenize=False) == original(
        user, add_generation_prompt=True, tokenize=False
    )
    if not same:
        raise RuntimeError("heretic's model copy renders prompts unlike the original template")
    return str(dest)


# ----------------------------------------------------------------------------- running


def run_ours(
    model: str, files: dict[str, str], out: Path, env: dict, seed: int, extra: list[str]
) -> dict:
    """`posttrain abliterate` (+ `extra` key=value) in a fresh process: wall seconds, report."""
    shutil.rmtree(out, ignore_errors=True)
    args = [model, "projected=true", f"output_dir={out}", f"seed={seed}", *extra]
    args += [f"{key.replace('_train', '')}={path}" for key, path in files.items()]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", OURS, *args], capture_output=True, text=True,
                          env=env, cwd=ROOT)  # fmt: skip
    seconds = time.perf_counter() - start
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"posttrain abliterate failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"seconds": seconds, "model": str(out / "final"), "report": report}


def toml_value(value) -> str:
    """A TOML scalar (JSON's string escapes are TOML's basic-string escapes)."""
    return str(value).lower() if isinstance(value, bool) else json.dumps(value)


def heretic_config(model: str, prompts: Path, study: Path, trials: int, seed: int) -> str:
    """config.toml for a non-interactive heretic run on local files (64 prompts a batch)."""
    top = {"model": model, "system_prompt": "", "batch_size": 64, "n_trials": trials,
           "n_startup_trials": min(60, max(1, trials // 3)), "seed": seed,
           "export_strategy": "merge", "study_checkpoint_dir": str(study)}  # fmt: skip
    parts = {"good_prompts": "harmless_train", "bad_prompts": "harmful_train",
             "good_evaluation_prompts": "harmless_val",
             "bad_evaluation_prompts": "harmful_val"}  # fmt: skip
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for table, part in parts.items():
        lines += ["", f"[{table}]", f"dataset = {toml_value(str(prompts / f'{part}.txt'))}"]
    return "\n".join(lines) + "\n"


def pick_trials(front: list[dict], kl_limit: float) -> dict[str, dict]:
    """{policy: trial} from heretic's Pareto front (validation refusals and heretic's KL)."""
    fewest = min(front, key=lambda t: (t["refusals"], t["kl"]))
    picks = {"fewest refusals": fewest}
    within = [t for t in front if t["kl"] <= kl_limit]
    if within:
        picks[f"fewest refusals, KL <= {kl_limit}"] = min(
            within, key=lambda t: (t["refusals"], t["kl"])
        )
    return picks


def heretic_rows(saved: dict[str, dict]) -> dict[str, str]:
    """{saved model path: row name}, one row per saved trial with every policy that chose it."""
    rows: dict[str, list[str]] = {}
    for policy, trial in saved.items():
        rows.setdefault(trial["path"], [f"trial {trial['trial']}"]).append(policy)
    return {path: f"heretic, {names[0]} ({'; '.join(names[1:])})" for path, names in rows.items()}


class HereticDriver:
    """Answers heretic's stdin menus: save each picked trial, then exit."""

    def __init__(self, save_root: Path, kl_limit: float):
        self.save_root, self.kl_limit = save_root, kl_limit
        self.front: list[dict] = []
        self.queue: list[tuple[str, dict]] = []
        self.saved: dict[str, dict] = {}
        self.current: tuple[str, dict] | None = None
        self.current_saved = False
        self.finished_at: float | None = None

    def answer(self, segment: str) -> str | None:
        """The reply to the prompt that ends `segment` (the output since the last reply)."""
        if "Which trial do you want to use?" in segment:
            return self.choose_trial(segment)
        if "What do you want to do with the decensored model?" in segment:
            return "5" if self.current_saved else "1"
        if segment.rstrip().endswith("Path to the folder::"):
            policy, trial = self.current
            path = self.save_root / f"trial-{trial['trial']}"
            self.saved[policy] = dict(trial, path=str(path))
            self.current_saved = True
            return str(path)
        return None

    def choose_trial(self, segment: str) -> str:
        if not self.front:
            self.finished_at = time.perf_counter()
            self.front = [
                {
                    "option": int(o),
                    "trial": int(t),
                    "refusals": int(r),
                    "of": int(n),
                    "kl": float(k),
                }
                for o, t, r, n, k in FRONT_ROW.findall(segment)
            ]
            if not self.front:
                raise RuntimeError("no Pareto front found in heretic's trial menu")
            self.queue = list(pick_trials(self.front, self.kl_limit).items())
        while self.queue:
            policy, trial = self.queue.pop(0)
            done = [p for p, t in self.saved.items() if t["trial"] == trial["trial"]]
            if done:
                self.saved[policy] = self.saved[done[0]]
                continue
            self.current, self.current_saved = (policy, trial), False
            return str(trial["option"])
        options = re.findall(r"\[(\d+)\] Exit program", segment)
        return options[-1]


def heretic_versions(python: str) -> str:
    """`heretic-llm x, transformers y, torch z` as installed in heretic's environment."""
    names = ("heretic-llm", "transformers", "torch")
    code = "from importlib.metadata import version as v; "
    code += f"print(', '.join(n + ' ' + v(n) for n in {names}))"
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() or proc.stderr.strip()[-300:]


def run_heretic(python: str, cwd: Path, env: dict, driver: HereticDriver, timeout: float) -> dict:
    """heretic in a fresh process, menus answered by `driver`; wall seconds and its log."""
    exe = str(Path(python).with_name("heretic"))
    cmd = [exe] if Path(exe).exists() else [python, "-m", "heretic.main"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            bufsize=0)  # fmt: skip
    decoder, segment, tail = codecs.getincrementaldecoder("utf-8")("replace"), "", ""
    with open(cwd / "heretic.log", "w") as log:  # written as it comes: progress is visible
        try:
            while True:
                if time.perf_counter() - start > timeout:
                    raise TimeoutError(f"heretic ran past {timeout:.0f} s")
                ready, _, _ = select.select([proc.stdout], [], [], 1.0)
                if not ready:
                    continue
                raw = os.read(proc.stdout.fileno(), 65536)
                if not raw:
                    break
                chunk = decoder.decode(raw)
                log.write(chunk)
                log.flush()
                segment, tail = segment + chunk, (tail + chunk)[-3000:]
                if segment.endswith(("Enter number: ", "Path to the folder:: ")):
                    reply = driver.answer(segment)
                    if reply is None:
                        raise RuntimeError(f"unexpected heretic prompt: {segment[-300:]!r}")
                    proc.stdin.write((reply + "\n").encode())
                    proc.stdin.flush()
                    segment = ""
        finally:
            if proc.poll() is None:
                proc.kill()
            code = proc.wait()
    seconds = time.perf_counter() - start
    if code != 0 or not driver.saved:
        raise RuntimeError(f"heretic exited with {code}:\n{tail}")
    return {"seconds": seconds, "optimization_seconds": (driver.finished_at or start) - start}


# ----------------------------------------------------------------------------- evaluating


def evaluate(original: str, edited: dict[str, str], sets: dict, world: Path, limit: int) -> dict:
    """`measure` for the original and every edited model, same prompts and tokenizer."""
    from posttrain.evaluate.generate import last_logits
    from posttrain.modeling.inference import load_for_inference
    from posttrain.steer.abliterate import refusal_first_tokens
    from posttrain.steer.evaluation import measure

    model, tok = load_for_inference(original)
    ids, _ = refusal_first_tokens(model, tok, sets["harmful_val"])
    base = last_logits(model, tok, sets["harmless_test"])
    test = (sets["harmful_test"], sets["harmless_test"], ids)
    results = {"original": measure(model, tok, *test, base, world, limit or None)}
    for name, path in edited.items():
        model, _ = load_for_inference(path)
        results[name] = measure(model, tok, *test, base, world, limit or None)
    return results


def table(results: dict, seconds: dict, sets: dict) -> str:
    n_bad, n_good = len(sets["harmful_test"]), len(sets["harmless_test"])
    headers = ["model", f"refusals, harmful test (of {n_bad})",
               f"refusals, harmless test (of {n_good})",
               "KL harmless (first token)", "accuracy", "perplexity", "wall s"]  # fmt: skip
    rows = []
    for name, m in results.items():
        wall = f"{seconds[name]:.0f}" if name in seconds else "-"
        rows.append([name, f"{m['refusal_rate_harmful'] * n_bad:.0f}",
                     f"{m['refusal_rate_harmless'] * n_good:.0f}", f"{m.get('kl_harmless', 0):.4f}",
                     f"{m['accuracy']:.3f}", f"{m['perplexity']:.2f}", wall])  # fmt: skip
    return common.markdown_table(headers, rows)


def readme_text(table_text: str, out: dict, argv: list[str] | None) -> str:
    """The README section: how it was run, the table, and heretic's failure if any."""
    heretic = out["heretic"] or {}
    command = " ".join(["python benchmarks/abliterate.py", *(argv or sys.argv[1:])])
    lines = [f"`{command}` on {out['machine']}; ours: {out['versions']}; heretic: "
             f"{heretic.get('versions', 'not run')}, {out['args']['trials']} trials. Test "
             f"prompts: {out['prompts']['harmful_test']} harmful, "
             f"{out['prompts']['harmless_test']} harmless, never seen by either tool.", "",
             table_text]  # fmt: skip
    if out["heretic_failure"]:
        lines += ["", f"heretic could not run: {out['heretic_failure']}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heretic-python", default="/tmp/heretic/bin/python",
                        help="python of the side venv where heretic-llm is installed")  # fmt: skip
    parser.add_argument(
        "--model", help="refusal model or run (default: evidence/abliteration.py's)"
    )
    parser.add_argument("--work", default="runs/bench-abliterate", help="working folder")
    parser.add_argument("--trials", type=int, default=200, help="heretic n_trials (its default)")
    parser.add_argument("--kl-limit", type=float, default=0.1, help="KL bound of pick (b)")
    parser.add_argument("--world-limit", type=int, default=0, help="world rows (0 = all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both tools")
    parser.add_argument("--timeout", type=float, default=3600, help="heretic's limit in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ours-variant", action="append", default=[], metavar="'K=V ...'",
                        help="an extra row: our command with these keys (repeatable)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="20 heretic trials, 100 world rows")
    parser.add_argument("--write", action="store_true", help="rewrite the README section")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.world_limit = 20, 100
    work = Path(args.work).resolve()
    if args.threads > 0:  # training and evaluation here (not timed) use the same threads
        import torch

        torch.set_num_threads(args.threads)
    (work / "heretic").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               **common.omp_env(args.threads))  # fmt: skip

    from posttrain.modeling.inference import resolve_model_path
    from posttrain.world.datasets import write_world_data

    write_world_data(work / "world", seed=args.seed, overwrite=True)
    model = resolve_model_path(refusal_model(work, args.model))
    files = world_files(work / "world")
    sets = prompt_parts(files, args.seed, work / "prompts")
    print(f"model {model}; prompts " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))

    edited, seconds, reports = {}, {}, {}
    for i, variant in enumerate(["", *args.ours_variant]):
        name = f"posttrain abliterate {variant}".strip()
        ours = run_ours(model, files, work / f"ours-{i}", env, args.seed, variant.split())
        edited[name], seconds[name], reports[name] = ours["model"], ours["seconds"], ours["report"]
        print(f"{name}: {ours['seconds']:.1f} s")
    heretic, failure = None, None
    try:
        copy = heretic_model_copy(model, work / "heretic" / "model")
        study = work / "heretic" / "study"  # a study left there would open heretic's resume menu
        shutil.rmtree(study, ignore_errors=True)
        config = heretic_config(copy, work / "prompts", study, args.trials, args.seed)
        (work / "heretic" / "config.toml").write_text(config)
        driver = HereticDriver(work / "heretic" / "saved", args.kl_limit)
        heretic_env = dict(env, KAGGLE_KERNEL_RUN_TYPE="benchmark", COLUMNS="200")
        heretic = run_heretic(args.heretic_python, work / "heretic", heretic_env, driver,
                              args.timeout)  # fmt: skip
        heretic |= {
            "front": driver.front,
            "picked": driver.saved,
            "versions": heretic_versions(args.heretic_python),
        }
        for path, policies in heretic_rows(driver.saved).items():
            edited[policies], seconds[policies] = path, heretic["seconds"]
        print(f"heretic: {heretic['seconds']:.1f} s")
    except Exception as exc:  # heretic's failure is a result: say exactly why
        failure = f"{type(exc).__name__}: {exc}"
        print(f"heretic could not run here: {failure}")

    results = evaluate(model, edited, sets, work / "world", args.world_limit)
    text = table(results, seconds, sets)
    print(text)
    out = {"machine": common.machine(), "load_end": os.getloadavg()[0], "args": vars(args),
           "versions": common.versions("torch", "transformers", "peft"),
           "model": model, "prompts": {k: len(v) for k, v in sets.items()}, "results": results,
           "seconds": seconds, "ours_reports": reports, "heretic": heretic,
           "heretic_failure": failure}  # fmt: skip
    from posttrain.io import write_json

    write_json(work / "results.json", out)
    print(f"wrote {work / 'results.json'}")
    if args.write:
        common.update_readme(SECTION, readme_text(text, out, argv))
    return 0 if failure is None else 1


if __name__ == "__main__":
    sys.exit(main())

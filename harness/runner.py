"""The scenario runner behind ``odst scenario``: find scenario files, run each in a fresh Network.

    odst scenario list
    odst scenario run scenarios/chain3 [scenarios/hub4.py ...] [--keep] [--workdir DIR]
    odst scenario run --all

``odst scenario`` imports this from the checkout (the ``odst`` wheel does not ship the harness).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from harness.network import Network, ScenarioFailed

__all__ = ["load_scenario", "run_scenario", "main"]

REPO_SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"


def load_scenario(path: Path):
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"odst_scenario_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ScenarioFailed(f"cannot load scenario {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "run", None)):
        raise ScenarioFailed(f"scenario {path} has no run(net) function")
    return module


def summary_line(module) -> str:
    doc = (module.__doc__ or module.run.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def run_scenario(path: Path, workdir: Path | None = None, *, keep: bool = False, out=None) -> dict:
    """Run one scenario file in ``workdir`` (a fresh temp dir by default); raise ScenarioFailed.

    Returns the figures the scenario recorded in ``net.results`` plus ``seconds``.
    The work dir is removed after a success unless ``keep`` (or it was given); kept on failure.
    """
    path = Path(path)
    module = load_scenario(path)
    given = workdir is not None
    workdir = Path(workdir) if given else Path(tempfile.mkdtemp(prefix=f"odst-{path.stem}-"))
    net = Network(workdir, title=path.stem, out=out)
    net.say(f"scenario {path.stem}: {summary_line(module)}")
    net.say(f"work dir {workdir}; started {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime())}; "
            f"site logs: {workdir}/<site>.log, <site>/run/nats.log")
    ok = False
    try:
        module.run(net)
        ok = True
    finally:
        try:
            net.close()
        finally:
            elapsed = time.monotonic() - net.started
            net.say(f"scenario {path.stem} {'PASSED' if ok else 'FAILED'} in {elapsed:.1f}s")
            if ok and not given and not keep:
                shutil.rmtree(workdir, ignore_errors=True)
            elif not ok:
                net.say(f"logs and data kept in {workdir}")
    return {**net.results, "seconds": elapsed}


def scenario_dirs() -> list[Path]:
    dirs = [Path.cwd() / "scenarios", REPO_SCENARIOS]
    out = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def all_scenarios() -> list[Path]:
    for d in scenario_dirs():
        found = sorted(p for p in d.glob("*.py") if not p.name.startswith("_"))
        if found:
            return found
    return []


def resolve(arg: str) -> Path:
    p = Path(arg)
    for candidate in (p, p.with_name(p.name + ".py")):
        if candidate.is_file():
            return candidate
    for d in scenario_dirs():
        for candidate in (d / p.name, d / (p.name + ".py")):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"no scenario {arg!r} (looked in {', '.join(str(d) for d in scenario_dirs())})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="odst scenario", description="run multi-site scenarios")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the scenarios and what each shows")
    p = sub.add_parser("run", help="run scenarios (files or names in scenarios/)")
    p.add_argument("scenarios", nargs="*", help="scenarios/NAME or scenarios/NAME.py")
    p.add_argument("--all", action="store_true", help="every scenario in scenarios/")
    p.add_argument("--workdir", type=Path, help="put data dirs and logs here (kept)")
    p.add_argument("--keep", action="store_true", help="keep the work dir after a success")
    args = parser.parse_args(argv)

    if args.cmd == "list":
        scenarios = all_scenarios()
        if not scenarios:
            print("no scenarios found", file=sys.stderr)
            return 1
        width = max(len(p.stem) for p in scenarios)
        for path in scenarios:
            try:
                line = summary_line(load_scenario(path))
            except Exception as exc:  # a broken file still gets listed
                line = f"(cannot load: {exc})"
            print(f"{path.stem:<{width}}  {line}")
        return 0

    try:
        paths = all_scenarios() if args.all else [resolve(a) for a in args.scenarios]
    except FileNotFoundError as exc:
        print(f"odst scenario: {exc}", file=sys.stderr)
        return 2
    if not paths:
        print("odst scenario: name a scenario or pass --all", file=sys.stderr)
        return 2
    def on_term(signum, frame):  # unwind through the finally blocks: every site gets stopped
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return _run_all(paths, args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_all(paths: list[Path], args) -> int:
    results: list[tuple[str, bool, float, str]] = []
    for path in paths:
        workdir = args.workdir / path.stem if args.workdir else None
        t0 = time.monotonic()
        try:
            run_scenario(path, workdir, keep=args.keep)
            results.append((path.stem, True, time.monotonic() - t0, ""))
        except ScenarioFailed as exc:
            print(f"\nFAILED {path.stem}: {exc}\n", file=sys.stderr, flush=True)
            results.append((path.stem, False, time.monotonic() - t0, str(exc).splitlines()[0]))
        except KeyboardInterrupt:
            print(f"\ninterrupted in {path.stem}", file=sys.stderr)
            return 130
        except Exception:
            traceback.print_exc()
            results.append((path.stem, False, time.monotonic() - t0, "error in the scenario itself"))
    if len(results) > 1:
        print("\nsummary:")
        for name, ok, secs, why in results:
            print(f"  {'PASS' if ok else 'FAIL'}  {name:<16} {secs:6.1f}s  {why}")
    return 0 if all(ok for _, ok, _, _ in results) else 1

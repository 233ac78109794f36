"""The Fleet API under load: N SuperNodes over gRPC and TLS, one SuperLink with its state on disk.

For each N in ``--nodes`` (default 20 and 50): a SuperLink (TLS, ``--database`` on disk, as
``fedser-server start`` runs it, so a restarted server resumes), N SuperNodes as separate
processes (N devices), all online before the run is submitted; then the transport app of the
end-to-end tests (``tests/e2e/toyapp``: the server sends an array to every node, each node adds
one and replies) runs ``--rounds`` rounds with every node in every round. It is the wire and
the SuperLink's state store that are under test here, not training, so the app does no work.

``--stock`` first runs the smallest N with Flower's own ``flower-superlink`` (the baseline: a
5 s SQLite busy timeout; a lost reply costs a whole round timeout, so larger N would take long)
and then every N with ``fedser-superlink`` (what fedser starts: the same SuperLink,
its writers given time to queue; see ``fedser.server.superlink``).

Figures per N: seconds until every node was online, and per round: messages sent, replies
received, replies that came back as errors (Flower's reason), replies lost (sent - received),
round time; and the lines of the SuperLink's and SuperNodes' logs that report a database or
transport error. Every reply counted means ``lost = 0`` and ``errors = 0``.

All SuperNodes share this machine's few cores, and each starts a ClientApp process per message;
as ``fedser demo`` does, their SuperExecs then poll for tasks less often
(``supernode.task_poll_interval``) so that those start-ups are spread out and each fits Flower's
30 s claim window; the table shows the interval used.

    python bench/bench_fleet.py [--nodes 20 50] [--rounds 3] [--round-timeout 240] [--stock]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, Report, load_average, load_note, machine_line, md_table

from fedser.common import processes
from fedser.client import supernode
from fedser.server import flower_cli
from fedser.common.certs import generate_ca_and_server_cert

TOYAPP = REPO / "tests" / "e2e" / "toyapp"
# CPU seconds to start one ClientApp process of the toy app (Python and Flower), measured here: 2.3 s.
TOY_LAUNCH_CPU_S = 2.5
HOST = "127.0.0.1"
# Lines that mean a reply or a heartbeat went wrong somewhere on the way.
TROUBLE = re.compile(r"database is locked|OperationalError|Failed to push|Failed to pull|StatusCode\.|"
                     r"Traceback|push session may have expired", re.IGNORECASE)


def run_fleet(n_nodes: int, rounds: int, round_timeout: float, work: Path, stock: bool = False) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    certs = generate_ca_and_server_cert(work / "certs")
    env = processes.flower_env(work / "flwr")
    control, fleet = processes.free_port(HOST), processes.free_port(HOST)
    argv = flower_cli.superlink_command(host=HOST, port=control, fleet_port=fleet, certs=certs,
                                    database=work / "superlink.db")
    if stock:
        argv[0] = processes.executable("flower-superlink")
    link = processes.start_process(argv, work / "logs" / "superlink.log", env=env)
    nodes: list[processes.LoggedProcess] = []
    try:
        processes.wait_for_port(HOST, control, timeout=60, process=link)
        processes.wait_for_port(HOST, fleet, timeout=60, process=link)
        flower_cli.write_connection(work / "flwr", flower_cli.SuperLinkConnection(f"{HOST}:{control}",
                                                                          root_cert=str(certs.ca_cert)))
        # As `fedser demo` does for devices sharing one machine: spread their ClientApp start-ups.
        poll = supernode.task_poll_interval(n_nodes, os.cpu_count() or 1, TOY_LAUNCH_CPU_S)
        node_env = {**env, **({supernode.TASK_POLL_ENV: str(poll)} if poll else {})}
        t0 = time.monotonic()
        for i in range(n_nodes):
            argv = supernode.supernode_command(f"{HOST}:{fleet}", {"partition-id": i}, root_cert=certs.ca_cert,
                                            runtime_port=processes.free_port(HOST))
            nodes.append(processes.start_process(argv, work / "logs" / f"node-{i}.log", env=node_env))
            time.sleep(supernode.start_spacing(n_nodes, poll))
        online = 0
        while online < n_nodes:
            if time.monotonic() - t0 > 600:
                raise TimeoutError(f"only {online} of {n_nodes} SuperNodes online after 600 s")
            time.sleep(2.0)
            try:
                online = sum(1 for x in flower_cli.list_nodes(env=env) if x.get("status") == "online")
            except flower_cli.FlowerCommandError:
                continue
        online_s = time.monotonic() - t0
        result = work / "result.json"
        t1 = time.monotonic()
        run_id = flower_cli.submit_run(TOYAPP, run_config={
            "result-path": str(result), "min-nodes": n_nodes, "num-server-rounds": rounds,
            "round-timeout": float(round_timeout)}, env=env)
        status = flower_cli.wait_for_run(run_id, env=env, timeout=rounds * round_timeout + 300, poll=2.0)
        run_s = time.monotonic() - t1
        report = json.loads(result.read_text()) if result.is_file() else {}
    finally:
        processes.stop_processes([*nodes, link])
    trouble = []
    for log in sorted((work / "logs").glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if TROUBLE.search(line):
                trouble.append(f"{log.name}: {line.strip()[:160]}")
    per_round = []
    for i, entries in enumerate(report.get("rounds", [])):
        sent = report["sent"][i]
        ok = sum(1 for e in entries if "w" in e)
        errors = [e["error"] for e in entries if "error" in e]
        per_round.append({"round": i + 1, "sent": sent, "received": ok, "errors": len(errors),
                          "error_reasons": sorted(set(errors)), "lost": sent - len(entries),
                          "seconds": report["round_seconds"][i]})
    return {"nodes": n_nodes, "poll": poll or 1.0, "status": f"{status.status}:{status.sub_status}", "online_s": online_s,
            "run_s": run_s, "rounds": per_round, "trouble": trouble}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[20, 50])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--round-timeout", type=float, default=240.0)
    p.add_argument("--stock", action="store_true", help="first run the smallest N with Flower's own flower-superlink (baseline)")
    p.add_argument("--work", default=None, help="folder for logs and state (default: a temporary one)")
    p.add_argument("--out", default="bench_fleet", help="results file name under bench/results/")
    args = p.parse_args(argv)

    rep = Report(args.out, "Fleet API under load: SuperNodes over gRPC/TLS, SuperLink state on disk")
    rep.add(machine_line() + f"; Flower {_flower_version()}")
    load_start = load_average()
    rows, notes = [], []
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fedser-fleet-"))
    try:
        plan = [(min(args.nodes), True)] * args.stock + [(n, False) for n in args.nodes]
        for n, stock in plan:
            link = "flower-superlink" if stock else "fedser-superlink"
            print(f"{link}: {n} SuperNodes, {args.rounds} rounds ...", flush=True)
            res = run_fleet(n, args.rounds, args.round_timeout, root / f"{link}-{n}", stock=stock)
            for r in res["rounds"]:
                rows.append([link, n, f"{res['poll']:g}", r["round"], r["sent"], r["received"], r["errors"], r["lost"], f"{r['seconds']:.1f}",
                             f"{res['online_s']:.0f}" if r["round"] == 1 else ""])
                if r["error_reasons"]:
                    notes.append(f"{link} N={n} round {r['round']}: errors {r['error_reasons']}")
            if len(res["rounds"]) < args.rounds:
                notes.append(f"{link} N={n}: the run ended {res['status']} after {len(res['rounds'])} round(s)")
            notes.append(f"{link} N={n}: run {res['status']} in {res['run_s']:.0f} s; {len(res['trouble'])} log line(s) "
                         "with a database or transport error" + (": " + "; ".join(res["trouble"][:5])
                                                                  if res["trouble"] else ""))
    finally:
        if not args.work:
            shutil.rmtree(root, ignore_errors=True)
    load_end = load_average()
    rep.add(md_table(["SuperLink", "SuperNodes", "task poll s", "round", "sent", "received", "errors", "lost", "round s", "online after s"],
                     rows))
    for note in notes:
        rep.add("- " + note)
    rep.add(load_note(load_start, load_end) + ".")
    rep.save()
    uncounted = sum(int(r[6]) + int(r[7]) for r in rows if r[0] == "fedser-superlink")   # errors + lost
    return 0 if uncounted == 0 and rows else 1


def _flower_version() -> str:
    from importlib.metadata import version

    return version("flwr")


if __name__ == "__main__":
    sys.exit(main())

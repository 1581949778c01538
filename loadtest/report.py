"""Summaries of a load-test run: JSON, a Markdown section for RESULTS.md, an SVG chart.

Standard library only. Medians over the repetitions; ratios are medians of per-pair ratios
(iamlet run and the nginx run next to it, same scenario, same repetition).
"""

import json
import math
import os
import statistics

SCENARIO_TITLES = {
    "creds-keepalive": "1 credentials, keep-alive",
    "creds-new-conn": "2 credentials, new conn/request",
    "container-keepalive": "1c container door (cached token), keep-alive",
    "container-new-conn": "2c container door (cached token), new conn/request",
    "role-list": "3 role listing",
    "imdsv2-token": "4a IMDSv2 token PUT",
    "imdsv2-get": "4b IMDSv2 GET with token",
    "imdsv2-flow": "4c IMDSv2 PUT→GET chained",
    "passthrough": "5 pass-through instance-id",
    "creds-10k": "fixed 10k req/s, credentials",
    "creds-10k-rt": "fixed 10k req/s, SCHED_FIFO",
}
# The container door's scenarios and the IMDS scenarios they are read beside.
CONTAINER_PAIRS = (("container-keepalive", "creds-keepalive", "keep-alive"),
                   ("container-new-conn", "creds-new-conn", "new connection per request"))
STORMS = ("storm", "storm_fake_sts", "storm_fake_sts_unbounded", "storm_fake_sts_small")
COMPARATOR = {
    "passthrough": "nginx proxy_pass (upstream keepalive)",
}


def med(xs):
    """The median of the values that are there (None where none is)."""
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(results):
    runs = results.get("runs", [])
    out = []
    scen = []
    for r in runs:
        if r["scenario"] not in scen:
            scen.append(r["scenario"])
    drivers = []
    for r in runs:
        if r["server"] == "iamlet" and r["driver"] not in drivers:
            drivers.append(r["driver"])
    for s in scen:
        row = {"scenario": s, "title": SCENARIO_TITLES.get(s, s), "client": None, "iamlet": {}, "ratio": {}, "ratio_cpu": {}}
        ng = [r for r in runs if r["scenario"] == s and r["server"] == "nginx"]
        row["nginx"] = agg(ng)
        fl = [r for r in runs if r["scenario"] == s and r["server"] == "floor"]
        row["floor"] = agg(fl)
        row["floor_vs_nginx"], row["vs_floor"] = {}, {}
        for d in drivers:
            mine = [r for r in runs if r["scenario"] == s and r["server"] == "iamlet" and r["driver"] == d]
            row["iamlet"][d] = agg(mine)
            ratios, cpu_ratios = [], []
            for r in mine:
                peer = [n for n in ng if n["rep"] == r["rep"] and n["pair_driver"] == d]
                if peer and peer[0]["rps"]:
                    ratios.append(r["rps"] / peer[0]["rps"])
                    if r.get("cpu_us_per_req") and peer[0].get("cpu_us_per_req"):
                        cpu_ratios.append(r["cpu_us_per_req"] / peer[0]["cpu_us_per_req"])
            fv, vf = [], []
            for f in fl:
                if f["pair_driver"] != d or not f["rps"]:
                    continue
                n = [x for x in ng if x["rep"] == f["rep"] and x["pair_driver"] == d]
                i = [x for x in mine if x["rep"] == f["rep"]]
                if n and n[0]["rps"]:
                    fv.append(f["rps"] / n[0]["rps"])
                if i:
                    vf.append(i[0]["rps"] / f["rps"])
            row["floor_vs_nginx"][d] = med(fv)
            row["vs_floor"][d] = med(vf)
            row["ratio"][d] = med(ratios)
            row["ratio_cpu"][d] = med(cpu_ratios)
            if mine:
                row["client"] = mine[0].get("client")
        out.append(row)
    return {"drivers": drivers, "rows": out}


def agg(rs):
    if not rs:
        return None
    return {
        "n": len(rs),
        "rps": med([r["rps"] for r in rs]),
        "p50_us": med([r.get("p50_us") for r in rs]),
        "p99_us": med([r.get("p99_us") for r in rs]),
        "p999_us": med([r.get("p999_us") for r in rs]),
        "cpu_us_per_req": med([r.get("cpu_us_per_req") for r in rs]),
        "user_us_per_req": med([r.get("user_us_per_req") for r in rs]),
        "system_us_per_req": med([r.get("system_us_per_req") for r in rs]),
        "syscalls_per_req": {k: med([(r.get("syscalls_per_req") or {}).get(k, 0.0) for r in rs])
                             for k in sorted({k for r in rs for k in (r.get("syscalls_per_req") or {})})},
        "peak_rss_kib": max(r.get("peak_rss_kib") or 0 for r in rs),
        "errors": sum(r.get("errors", 0) for r in rs),
        "requests": sum(r.get("requests", 0) for r in rs),
        "rss_anon_kib": med([r.get("rss_anon_kib") for r in rs]),
        "upstream_conn_pct": med([100.0 * r["upstream_connections"] / r["requests"] for r in rs
                                  if r.get("upstream_connections") is not None and r.get("requests")]),
    }


def floor_markdown(summ):
    """The floor server beside nginx and iamlet, where it ran."""
    rows = [r for r in summ["rows"] if r.get("floor")]
    if not rows:
        return []
    drivers = summ["drivers"]
    L = ["The floor: `tool floor` answers iamlet's own bytes from an edge-triggered epoll loop that does nothing "
         "else (one `recv` and one `send` per keep-alive request, no parsing but the blank line), under the same "
         "cap, interleaved in the same repetitions. No epoll server answering these bytes can pass it here, so "
         "floor/nginx is the ceiling of any server/nginx ratio on the epoll driver.",
         "",
         "| scenario | floor req/s | floor CPU µs/req | " + " | ".join(f"floor/nginx (pairs of {d})" for d in drivers)
         + " | " + " | ".join(f"iamlet {d}/floor" for d in drivers) + " |",
         "|---" * (3 + 2 * len(drivers)) + "|"]
    for r in rows:
        L.append(f"| {r['title']} | {fmt(r['floor'].get('rps'))} | {fmt(r['floor'].get('cpu_us_per_req'), 1)} | "
                 + " | ".join(f"{fmt(r['floor_vs_nginx'].get(d), 2)}×" for d in drivers) + " | "
                 + " | ".join(f"{fmt(r['vs_floor'].get(d), 2)}×" for d in drivers) + " |")
    L.append("")
    return L


def cpu_split_markdown(summ):
    """Where a request's CPU time goes, user space or the kernel, per server (median), and
    the most any server doing the same kernel work could reach against nginx here: nginx's
    whole CPU per request over that server's kernel time alone (no user space at all)."""
    drivers = summ["drivers"]
    lines = []
    for r in summ["rows"]:
        if r["scenario"] != "creds-keepalive":
            continue
        ng = r["nginx"] or {}
        for who, a in [*((f"iamlet {d}", r["iamlet"].get(d)) for d in drivers), ("nginx", ng),
                       ("floor", r.get("floor"))]:
            a = a or {}
            user, system = a.get("user_us_per_req"), a.get("system_us_per_req")
            if user is None or system is None or not (user + system):
                continue
            ceiling = ng["cpu_us_per_req"] / system if system and ng.get("cpu_us_per_req") else None
            lines.append(f"| {r['title']} | {who} | {user:.2f} | {system:.2f} | {100 * system / (user + system):.0f} % | "
                         f"{fmt(ceiling, 2)}× |")
    if not lines:
        return []
    return ["Where a request's CPU goes (`/proc/<pid>/stat` utime and stime over the run, per request, median). "
            "Kernel time includes the loopback TCP work a send does for the receiving end. The last column is the "
            "ceiling that kernel work sets: nginx's CPU per request over this server's kernel time alone, the "
            "server/nginx ratio it would reach with no user space at all.", "",
            "| scenario | server | user µs/req | kernel µs/req | kernel share | ceiling vs nginx |",
            "|---|---|---|---|---|---|", *lines, ""]


def syscalls_markdown(summ):
    """System calls per request (bench.py --syscalls), median per server."""
    drivers = summ["drivers"]
    lines = []
    for r in summ["rows"]:
        for who, a in [*((f"iamlet {d}", r["iamlet"].get(d)) for d in drivers), ("nginx", r["nginx"]),
                       ("floor", r.get("floor"))]:
            calls = (a or {}).get("syscalls_per_req") or {}
            shown = ", ".join(f"`{k}` {v:.2f}" for k, v in calls.items() if v >= 0.005)
            if shown:
                lines.append(f"| {r['title']} | {who} | {shown} |")
    if not lines:
        return []
    return ["System calls per request (`perf stat` tracepoints on every thread of the server, median):", "",
            "| scenario | server | calls per request |", "|---|---|---|", *lines, ""]


def container_summary(results, summ):
    """The container door (cached token) beside the IMDS cached-credentials path and nginx,
    per driver: req/s, latency, CPU per request, and the ratios (medians of per-repetition
    pairs: the door's run and the IMDS run of the same iamlet process)."""
    runs = results.get("runs", [])
    rows = {r["scenario"]: r for r in summ["rows"]}
    out = []
    for door, imds, how in CONTAINER_PAIRS:
        if door not in rows:
            continue
        for d in summ["drivers"]:
            mine = [r for r in runs if r["scenario"] == door and r["server"] == "iamlet" and r["driver"] == d]
            ratios, cpu_ratios = [], []
            for r in mine:
                peer = [x for x in runs if x["scenario"] == imds and x["server"] == "iamlet" and x["driver"] == d
                        and x["rep"] == r["rep"]]
                if peer and peer[0]["rps"]:
                    ratios.append(r["rps"] / peer[0]["rps"])
                    if r.get("cpu_us_per_req") and peer[0].get("cpu_us_per_req"):
                        cpu_ratios.append(r["cpu_us_per_req"] / peer[0]["cpu_us_per_req"])
            out.append({
                "connections": how, "driver": d, "door": rows[door]["iamlet"].get(d),
                "imds": (rows.get(imds) or {}).get("iamlet", {}).get(d),
                "nginx": rows[door]["nginx"], "nginx_imds": (rows.get(imds) or {}).get("nginx"),
                "door_vs_imds": med(ratios), "door_vs_imds_cpu": med(cpu_ratios),
                "door_vs_nginx": rows[door]["ratio"].get(d), "imds_vs_nginx": (rows.get(imds) or {}).get("ratio", {}).get(d),
                "client": rows[door]["client"],
            })
    return out


def container_markdown(results, rows):
    if not rows:
        return []
    L = []
    bb = results.get("body_bytes") or {}
    ver = results.get("container_verifications") or []
    L.append("Container door (`GET /v1/credentials`, `Authorization: <service-account JWT>`, `Host: 169.254.170.23`) "
             "with a token iamlet has already verified — a SHA-256 of the token and a per-worker map lookup — beside "
             "the IMDS cached-credentials path (1, 2) run by the same iamlet process, and nginx answering the same "
             f"request with a body of the same length ({fmt(bb.get('container'))} bytes; token {fmt(bb.get('sa_token'))} "
             "bytes, RS256, 2048-bit key from openssl, in the JWKS given by `--token-jwks-file`). Same client and "
             "settings as 1 and 2 (50 connections). Ratios: medians of per-repetition pairs.")
    L.append("")
    L.append("| connections | driver | client | door req/s | IMDS req/s | nginx req/s (door request) | door/IMDS | door/nginx | "
             "IMDS/nginx | door p50 / p99 / p99.9 µs | IMDS p50 / p99 / p99.9 µs | nginx p50 / p99 / p99.9 µs | "
             "CPU µs/req door / IMDS / nginx | door/IMDS CPU |")
    L.append("|---" * 14 + "|")
    for r in rows:
        door, imds, ng = r["door"] or {}, r["imds"] or {}, r["nginx"] or {}
        L.append(f"| {r['connections']} | {r['driver']} | {r['client']} | {fmt(door.get('rps'))} | {fmt(imds.get('rps'))} | "
                 f"{fmt(ng.get('rps'))} | **{fmt(r['door_vs_imds'], 2)}×** | **{fmt(r['door_vs_nginx'], 2)}×** | "
                 f"{fmt(r['imds_vs_nginx'], 2)}× | {lat(r['door'])} | {lat(r['imds'])} | {lat(r['nginx'])} | "
                 f"{fmt(door.get('cpu_us_per_req'), 1)} / {fmt(imds.get('cpu_us_per_req'), 1)} / "
                 f"{fmt(ng.get('cpu_us_per_req'), 1)} | {fmt(r['door_vs_imds_cpu'], 2)}× |")
    L.append("")
    if ver:
        counts = sorted({v["verified"] for v in ver if v["verified"] is not None})
        L.append(f"Tokens verified on first sight, per iamlet process over all its runs (`iamlet_container_credentials_total"
                 f"{{outcome=\"verified\"}}`, {ver[0]['workers']} worker(s)): {', '.join(str(c) for c in counts) or '–'} "
                 "— the one warm-up request before the measured runs; every measured request was a remembered token.")
        L.append("")
    return L


def scaling_summary(results):
    rows = results.get("scaling") or []
    counts = []
    for r in rows:
        if r["pods"] not in counts:
            counts.append(r["pods"])
    counts.sort()
    out = []
    base = None
    for n in counts:
        rs = [r for r in rows if r["pods"] == n]
        a = agg(rs)
        a["pods"] = n
        a["roles"] = rs[0]["roles"]
        a["rss_kib"] = med([r.get("rss_kib") for r in rs])
        if base is None:
            base = a["rps"]
        a["vs_first"] = a["rps"] / base if base else None
        out.append(a)
    return out


def problems(results):
    p = []
    for r in results.get("runs", []):
        if r.get("errors"):
            p.append(f"{r['scenario']} {r['server']} {r['driver']} rep {r['rep']}: {r['errors']} errors {r.get('error_kinds')}")
        if not r.get("requests"):
            p.append(f"{r['scenario']} {r['server']} {r['driver']} rep {r['rep']}: no requests")
    for v in results.get("container_verifications") or []:
        # Each worker verifies the one token once (the first sight); more means the measured
        # requests were not the remembered-token path.
        if v["verified"] is None or v["verified"] > v["workers"]:
            p.append(f"container door {v['driver']} rep {v['rep']}: {v['verified']} token verifications "
                     f"for {v['workers']} worker(s) (expected at most one per worker)")
    for r in results.get("scaling") or []:
        if r.get("errors"):
            p.append(f"scaling {r['pods']} pods: {r['errors']} errors {r.get('error_kinds')}")
    for key in STORMS:
        st = results.get(key)
        if not st:
            continue
        for ph in ("a", "b"):
            if st[ph]["first_requests_errors"]:
                    p.append(f"{key} phase {ph}: {st[ph]['first_requests_errors']} failed first requests")
        if st["a"]["first_request_misses"]:
            p.append(f"{key}: {st['a']['first_request_misses']:.0f} first requests missed the cache after all were fetched")
        if st["a"]["assume_role_calls"] != st["roles"]:
            p.append(f"{key}: {st['a']['assume_role_calls']:.0f} AssumeRole calls for {st['roles']} roles")
    sk = results.get("soak")
    if sk:
        if sk["errors"] or sk["wrong_role"]:
            p.append(f"soak: {sk['errors']} errors, {sk['wrong_role']} wrong-role answers")
        if not sk["requests"]:
            p.append("soak: no requests")
    if results.get("attack"):
        import attack

        p += attack.problems(results)
    if results.get("upgrade"):
        import upgrade

        p += upgrade.problems(results)
    if results.get("workers"):
        import workers

        p += workers.problems(results)
    if results.get("shared"):
        import shared

        p += shared.problems(results)
    return p


def pct(xs, q):
    """The q-quantile of xs (nearest rank), None for no samples."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[max(0, math.ceil(q * len(xs)) - 1)]


def run_problems(part, runs, label):
    """A line for each run of `part` that had errors or answered nothing; `label(run)` names
    the run."""
    p = []
    for x in runs:
        if x.get("errors"):
            p.append(f"{part} {label(x)}: {x['errors']} errors {x.get('error_kinds')}")
        if not x.get("requests"):
            p.append(f"{part} {label(x)}: no requests")
    return p


def option(a, name, full, short):
    """A part's setting: the command line's (`a.<name>`), else the full run's or the smoke's."""
    v = getattr(a, name, None)
    return v if v is not None else (short if a.smoke else full)


def fmt(x, nd=0):
    if x is None:
        return "–"
    return f"{x:,.{nd}f}"


def esc(s):
    """Text for an SVG element."""
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def lat(a):
    if not a:
        return "–"
    return f"{fmt(a['p50_us'])} / {fmt(a['p99_us'])} / {fmt(a['p999_us'])}"


def targets(results, summ, scal):
    t = []
    rows = {r["scenario"]: r for r in summ["rows"]}

    def ratio(s, d):
        r = rows.get(s)
        return r["ratio"].get(d) if r else None

    # Targets of the scenarios that ran (`--only` may leave some out): cached credentials at
    # 1.3x nginx with keep-alive and at least level with it on a new connection per request,
    # on both drivers.
    goals = {"creds-keepalive": 1.3, "creds-new-conn": 1.0}
    for s in [x for x in goals if x in rows]:
        g = goals[s]
        for d, name in (("uring", "io_uring"), ("epoll", "epoll")):
            v = ratio(s, d)
            t.append((f"scenario {s}: iamlet ({name}) ≥ {g:.1f}× nginx req/s", f"{fmt(v, 2)}×",
                      v is not None and v >= g))
    for d in summ["drivers"] if "passthrough" in rows else ():
        v = ratio("passthrough", d)
        t.append((f"scenario 5 ({d}): ≥ 1.0× nginx proxy_pass", f"{fmt(v, 2)}×", v is not None and v >= 1.0))
    for sid, how in (("creds-10k", ""), ("creds-10k-rt", ", SCHED_FIFO")):
        r10 = rows.get(sid)
        if not r10:
            continue
        for d in summ["drivers"]:
            a = r10["iamlet"].get(d)
            if a:
                n = r10["nginx"]
                t.append((f"p99 < 1 ms at a fixed {results['settings'].get('fixed_rate', 10000):,} req/s ({d}{how})",
                          f"{fmt(a['p99_us'])} µs at {fmt(a['rps'])} req/s (nginx {fmt((n or {}).get('p99_us'))} µs)",
                          a["p99_us"] < 1000))
    for key in STORMS:
        st = results.get(key)
        if not st:
            continue
        ra, rb = st["a"], st["b"]
        args = [x for x in st.get("iamlet_args", []) if x != "--sts-rate-limit=10000"]
        via = f" (STS: {st.get('sts', key)}{'; ' + ' '.join(args) if args else ''})"
        mib = ra["rss_kib"] / 1024 if ra["rss_kib"] > 0 else None
        if not args and st["pods"] == max(x["pods"] for k in STORMS if (x := results.get(k))):
            t.append((f"RSS < 20 MiB with {st['pods']} pods / {st['roles']} roles{via}",
                      f"{fmt(mib, 1)} MiB VmRSS (peak {fmt(ra['hwm_kib'] / 1024, 1)}; anonymous "
                      f"{fmt(ra.get('rss_anon_kib', 0) / 1024, 1)}, binary pages {fmt(ra.get('rss_file_kib', 0) / 1024, 1)})",
                      mib is not None and mib < 20))
        lim = st["sts_rtt_ms"] + 50
        t.append((f"pod storm: all {st['pods']} cached within STS RTT + 50 ms ({lim:.0f} ms) of the publish{via}",
                  f"{fmt(ra['all_cached_after_publish_ms'])} ms", ra["all_cached_after_publish_ms"] <= lim))
        t.append((f"pod storm: first requests at publish + RTT + 50 ms are cache hits{via}",
                  f"{fmt(rb['first_request_hits'])} / {st['pods']} hits", rb["first_request_misses"] == 0))
        t.append((f"pod storm: AssumeRole count == distinct roles{via}", f"{fmt(ra['assume_role_calls'])} for {st['roles']}",
                  ra["assume_role_calls"] == st["roles"]))
    sk = results.get("soak")
    if sk:
        t.append((f"soak ({sk['duration_s']:.0f} s): RSS growth < 5 % after warm-up",
                  f"{sk['rss_growth_pct']:+.1f} % (max {sk['rss_max_growth_pct']:+.1f} %; anonymous {sk.get('anon_growth_pct', 0):+.1f} %)",
                  sk["rss_growth_pct"] < 5))
        t.append(("soak: zero errors, zero wrong-role answers", f"{sk['errors']} errors, {sk['wrong_role']} wrong", not sk["errors"] and not sk["wrong_role"]))
    if results.get("runs"):
        errs = sum(r.get("errors", 0) for r in results["runs"])
        t.append(("zero errors in every scenario", f"{errs} errors", errs == 0))
    if scal and len(scal) > 1:
        worst = min(a["vs_first"] for a in scal[1:])
        t.append((f"credential path not slower with {scal[-1]['pods']:,} pods than with {scal[0]['pods']:,}",
                  f"worst {worst:.2f}× of the {scal[0]['pods']}-pod rate", worst >= 0.9))
    wk = results.get("workers")
    if wk:
        errs = sum(r.get("errors", 0) for r in wk["runs"])
        t.append((f"worker scaling (W = 1–{wk['settings']['max_workers']}): zero errors", f"{errs} errors", errs == 0))
    if results.get("shared"):
        import shared

        t += shared.targets(results)
    return t


def markdown(results, summ, scal, svg_rel, attack_svg_rel=None, upgrade_svg_rel=None, workers_svg_rel=None):
    e = results["environment"]
    L = []
    title = "Smoke run" if results.get("smoke") else "Data-plane load test"
    L.append(f"## {title} — {e['date']} — commit `{e['commit']}`{' (+ uncommitted changes)' if e.get('tree_dirty') else ''}")
    L.append("")
    L.append(f"- Machine: {e['cpu']}, {e['cores']} cores, kernel {e['kernel']}; load average at start "
             f"{' '.join(e['loadavg_start'])}, at end {' '.join(e.get('loadavg_end', []))}.")
    s = results["settings"]
    if not summ["rows"] and not scal:
        # Only parts with sections of their own (storms, soak, attack, upgrade, workers): each
        # says how it ran; the matrix's pinning and repetitions do not apply.
        L.append(f"- Parts run: {', '.join(results.get('parts') or [])} (bench.py `--only` / `--skip`); iamlet "
                 f"{e['iamlet_profile']} build; {e.get('oha') or 'built-in client only'}. "
                 f"Raw data: `{results.get('json_rel', '')}`.")
        L.append("")
    else:
        L.append(f"- Pinning: iamlet and nginx on CPU {e['server_cpus']} ({e['workers']} worker / worker process each), "
                 f"load client + fake IMDS + moto on CPU {e['client_cpus']} (taskset). iamlet {e['iamlet_profile']} build; "
                 f"{e.get('nginx') or 'no nginx'}; {e.get('oha') or 'built-in client only'}.")
        if e.get("server_cpu_cap"):
            L.append(f"- Saturating runs (scenarios 1–5 and the lookup scaling): the server under test is capped at {e['server_cpu_cap']:g} of one CPU "
                     "(cgroup v1 `cpu.cfs_quota_us`, 10 ms periods), so the server — not the load generator, which has one "
                     "core — is the limit and req/s compares server capacity; their latencies include the throttling gaps. "
                     "The fixed-rate rows run uncapped.")
        L.append(f"- {s['reps']} repetitions × {s['duration']} s per run, iamlet and nginx interleaved (order alternating), "
                 f"medians reported; ratio = median of per-pair ratios. {s['pods']} pods / {s['roles']} roles known; "
                 f"requests from the pod at 127.0.0.1.")
        L.append(f"- Raw data: `{results.get('json_rel', '')}`."
                 + (f" Chart: ![req/s and p99]({svg_rel})" if svg_rel else ""))
        L.append("")
    drivers = summ["drivers"]
    if summ["rows"]:
        L.append("| scenario | client | " + " | ".join(f"iamlet {d} req/s" for d in drivers) + " | nginx req/s | "
                 + " | ".join(f"{d}/nginx" for d in drivers) + " | errors (iamlet/nginx) |")
        L.append("|---" * (4 + 2 * len(drivers)) + "|")
        for r in summ["rows"]:
            errs_i = sum((r["iamlet"][d] or {}).get("errors", 0) for d in drivers if r["iamlet"].get(d))
            errs_n = (r["nginx"] or {}).get("errors", "–")
            L.append(f"| {r['title']} | {r['client']} | "
                     + " | ".join(fmt((r['iamlet'].get(d) or {}).get('rps')) for d in drivers)
                     + f" | {fmt((r['nginx'] or {}).get('rps'))} | "
                     + " | ".join(f"**{fmt(r['ratio'].get(d), 2)}×**" for d in drivers)
                     + f" | {errs_i} / {errs_n} |")
        L.append("")
        L.append("Latency p50 / p99 / p99.9 (µs), server CPU per request (µs, from /proc utime+stime), peak RSS (MiB, VmHWM):")
        L.append("")
        L.append("| scenario | " + " | ".join(f"{d} latency" for d in drivers) + " | nginx latency | "
                 + " | ".join(f"{d} CPU" for d in drivers) + " | nginx CPU | "
                 + " | ".join(f"{d} RSS" for d in drivers) + " | nginx RSS |")
        L.append("|---" * (4 + 3 * len(drivers)) + "|")
        for r in summ["rows"]:
            L.append(f"| {r['title']} | "
                     + " | ".join(lat(r['iamlet'].get(d)) for d in drivers)
                     + f" | {lat(r['nginx'])} | "
                     + " | ".join(fmt((r['iamlet'].get(d) or {}).get('cpu_us_per_req'), 1) for d in drivers)
                     + f" | {fmt((r['nginx'] or {}).get('cpu_us_per_req'), 1)} | "
                     + " | ".join(fmt(((r['iamlet'].get(d) or {}).get('peak_rss_kib') or 0) / 1024, 1) for d in drivers)
                     + f" | {fmt(((r['nginx'] or {}).get('peak_rss_kib') or 0) / 1024, 1)} |")
        L.append("")
        L += floor_markdown(summ)
        L += cpu_split_markdown(summ)
        L += syscalls_markdown(summ)
        pt = next((r for r in summ["rows"] if r["scenario"] == "passthrough"), None)
        if pt:
            parts = [f"iamlet {d} {fmt((pt['iamlet'].get(d) or {}).get('upstream_conn_pct'), 1)} %" for d in drivers]
            parts.append(f"nginx {fmt((pt['nginx'] or {}).get('upstream_conn_pct'), 1)} %")
            L.append("Pass-through requests that opened a new upstream connection (fake IMDS accepts / requests, median): "
                     + ", ".join(parts) + ".")
            L.append("")
        L += container_markdown(results, results.get("container_summary") or container_summary(results, summ))
        L.append("nginx comparator: `return 200` with a body of the same length for 1–4 and 1c–2c, `proxy_pass` with upstream "
                 f"keepalive {s.get('nginx_upstream_keepalive')} to the same fake IMDS for 5 (iamlet keeps 64 idle upstream "
                 "connections per worker).")
        L.append("")
    if scal:
        L.append(f"Lookup scaling (credentials, keep-alive, 50 connections from 50 distinct pod IPs, "
                 f"driver {results['scaling'][0]['driver']}):")
        L.append("")
        L.append("| known pods | roles | req/s | vs first | p50 / p99 / p99.9 µs | CPU µs/req | RSS MiB | errors |")
        L.append("|---|---|---|---|---|---|---|---|")
        for a in scal:
            L.append(f"| {a['pods']:,} | {a['roles']} | {fmt(a['rps'])} | {fmt(a['vs_first'], 2)}× | {lat(a)} | "
                     f"{fmt(a['cpu_us_per_req'], 1)} | {fmt((a['rss_kib'] or 0) / 1024, 1)} | {a['errors']} |")
        L.append("")
    for key in STORMS:
        st = results.get(key)
        if not st:
            continue
        ra, rb = st["a"], st["b"]
        args = " ".join(st.get("iamlet_args", ["--sts-rate-limit=10000"]))
        L.append(f"Pod storm, STS = {st.get('sts', key)} ({st['pods']} pods with distinct roles in one pods-file rewrite; "
                 f"median AssumeRole RTT measured directly {st['sts_rtt_ms']:.1f} ms; `{args}`):")
        L.append("")
        L.append(f"- iamlet published the new pods {ra['publish_after_write_ms']:.0f} ms after the write (pods-file poll); "
                 f"50 % cached after {ra['half_cached_ms']:.0f} ms, 90 % after {ra['p90_cached_ms']:.0f} ms, all after "
                 f"**{ra['all_cached_after_publish_ms']:.0f} ms** (from the publish"
                 + (f"; the fake STS had answered the last call at {ra['sts_answered_all_after_publish_ms']:.0f} ms"
                    if ra.get("sts_answered_all_after_publish_ms", -1) >= 0 else "")
                 + f"; {ra.get('metrics_scrapes_while_waiting', 0)} /metrics scrapes while waiting).")
        L.append(f"- Then every pod's first request: {ra['first_requests_ok']} ok, {ra['first_requests_errors']} errors, "
                 f"{ra['first_request_misses']:.0f} cache misses; AssumeRole calls **{ra['assume_role_calls']:.0f}** "
                 f"(+{ra['assume_role_calls_after_first_requests']:.0f} after); iamlet RSS {ra['rss_kib'] / 1024:.1f} MiB "
                 f"(peak {ra['hwm_kib'] / 1024:.1f} MiB): {ra.get('rss_anon_kib', 0) / 1024:.1f} MiB anonymous + "
                 f"{ra.get('rss_file_kib', 0) / 1024:.1f} MiB mapped binary.")
        if st.get("iamlet_cpu_ms_per_pod") is not None:
            L.append(f"- iamlet CPU over both storms: {st['iamlet_cpu_s']:.2f} s, {st['iamlet_cpu_ms_per_pod']:.2f} ms per new pod "
                     "(AssumeRole call, rendering, first request, and the harness's /metrics polling).")
        L.append(f"- Second storm, first requests sent {rb['first_requests_sent_after_publish_ms']:.0f} ms after the publish "
                 f"(RTT + 50 ms): {rb['first_request_hits']:.0f} hits, {rb['first_request_misses']:.0f} misses (misses wait "
                 f"for their AssumeRole: latency p50/p99 {fmt(rb['p50_us'] / 1000, 1)}/{fmt(rb['p99_us'] / 1000, 1)} ms), "
                 f"{rb['first_requests_errors']} errors.")
        L.append("")
    sk = results.get("soak")
    if sk:
        L.append(f"Soak ({sk['duration_s']:.0f} s, {sk['pods']} pods / {sk['roles']} roles, {sk['conns']} connections, "
                 f"{sk['churn_per_step']} pods replaced every {sk['churn_every_ms']} ms on the same IPs — "
                 f"{sk['churned_pods']} replacements): {sk['requests']:,} requests ({fmt(sk['rps'])} req/s), "
                 f"**{sk['errors']} errors, {sk['wrong_role']} wrong-role answers**, {sk['transitions']} transitional "
                 f"answers (previous owner's role within {s.get('soak_grace', 3)} s of a replacement, before iamlet re-read "
                 f"the file); RSS {sk['rss_after_warmup_kib'] / 1024:.1f} MiB after warm-up ({sk['warmup_s']:.0f} s) → "
                 f"{sk['rss_end_kib'] / 1024:.1f} MiB at the end (**{sk['rss_growth_pct']:+.1f} %**, max "
                 f"{sk['rss_max_growth_pct']:+.1f} %); anonymous memory {sk.get('anon_after_warmup_kib', 0) / 1024:.1f} → "
                 f"{sk.get('anon_end_kib', 0) / 1024:.1f} MiB ({sk.get('anon_growth_pct', 0):+.1f} %, max "
                 f"{sk.get('anon_max_growth_pct', 0):+.1f} %).")
        pts = sk.get("timeline", [])
        if pts:
            step = max(1, len(pts) // 10)
            L.append("")
            L.append("| t (s) | " + " | ".join(f"{p['t_s']:.0f}" for p in pts[::step]) + " |")
            L.append("|---" * (1 + len(pts[::step])) + "|")
            L.append("| RSS MiB | " + " | ".join(f"{p['rss_kib'] / 1024:.1f}" for p in pts[::step]) + " |")
            L.append("| errors / wrong | " + " | ".join(f"{p['errors']}/{p['wrong_role']}" for p in pts[::step]) + " |")
        L.append("")
    if results.get("attack"):
        import attack

        L.append(attack.markdown(results, attack_svg_rel).rstrip("\n"))
        L.append("")
    if results.get("upgrade"):
        import upgrade

        L.append(upgrade.markdown(results, upgrade_svg_rel).rstrip("\n"))
        L.append("")
    if results.get("workers"):
        import workers

        L.append(workers.markdown(results, workers_svg_rel).rstrip("\n"))
        L.append("")
    if results.get("shared"):
        import shared

        L.append(shared.markdown(results).rstrip("\n"))
        L.append("")
    tg = targets(results, summ, scal)
    if tg:
        L.append("Targets:")
        L.append("")
        L.append("| target | measured | met |")
        L.append("|---|---|---|")
        for name, val, ok in tg:
            L.append(f"| {name} | {val} | {'yes' if ok else '**no**'} |")
        L.append("")
    return "\n".join(L) + "\n"


def svg(summ):
    rows = summ["rows"]
    drivers = summ["drivers"]
    series = [(f"iamlet {d}", "#1f77b4" if d == "uring" else "#2ca02c", lambda r, d=d: r["iamlet"].get(d)) for d in drivers]
    series.append(("nginx", "#d62728", lambda r: r["nginx"]))
    W = 980
    panel_h = 260
    left, top = 70, 40
    n = max(1, len(rows))
    gw = (W - left - 20) / n
    bw = gw * 0.8 / len(series)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{2 * panel_h + 170}" font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>']

    def panel(y0, key, label, scale_div=1.0):
        vals = [((s[2](r) or {}).get(key) or 0) / scale_div for r in rows for s in series]
        vmax = max(vals + [1e-9]) * 1.1
        out.append(f'<text x="{left}" y="{y0 - 12}" font-size="13" font-weight="bold">{label}</text>')
        out.append(f'<line x1="{left}" y1="{y0 + panel_h - 60}" x2="{W - 20}" y2="{y0 + panel_h - 60}" stroke="#333"/>')
        h = panel_h - 60
        for k in range(5):
            v = vmax * k / 4
            y = y0 + h - h * k / 4
            out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{W - 20}" y2="{y:.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{v:,.0f}</text>')
        for i, r in enumerate(rows):
            x0 = left + i * gw + gw * 0.1
            for j, s in enumerate(series):
                v = ((s[2](r) or {}).get(key) or 0) / scale_div
                bh = h * v / vmax
                x = x0 + j * bw
                out.append(f'<rect x="{x:.1f}" y="{y0 + h - bh:.1f}" width="{bw - 1:.1f}" height="{bh:.1f}" fill="{s[1]}">'
                           f'<title>{s[0]} {r["scenario"]}: {v:,.0f}</title></rect>')
            cx = left + i * gw + gw / 2
            out.append(f'<text x="{cx:.1f}" y="{y0 + h + 14}" text-anchor="middle" font-size="10">{r["scenario"]}</text>')

    panel(top + 10, "rps", "requests per second (median)")
    panel(top + panel_h + 60, "p99_us", "p99 latency, µs (median)")
    ly = 2 * panel_h + 150
    for j, s in enumerate(series):
        x = left + j * 160
        out.append(f'<rect x="{x}" y="{ly - 10}" width="12" height="12" fill="{s[1]}"/>')
        out.append(f'<text x="{x + 18}" y="{ly}">{s[0]}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write(results, out_dir, smoke=False):
    os.makedirs(out_dir, exist_ok=True)
    e = results["environment"]
    stamp = e["date"].replace(":", "").replace("-", "")
    base = f"{'smoke' if smoke else 'loadtest'}-{stamp}-{e['commit']}"
    summ = summarize(results)
    scal = scaling_summary(results)
    results["summary"] = summ
    results["scaling_summary"] = scal
    results["container_summary"] = container_summary(results, summ)
    results["targets"] = [{"target": n, "measured": v, "met": ok} for n, v, ok in targets(results, summ, scal)]
    jpath = os.path.join(out_dir, base + ".json")
    spath = os.path.join(out_dir, base + ".svg")
    results_md = os.path.join(os.path.dirname(os.path.abspath(out_dir)), "RESULTS.md") if not smoke else os.path.join(out_dir, "RESULTS.md")
    results["json_rel"] = os.path.relpath(jpath, os.path.dirname(results_md))
    with open(jpath, "w") as f:
        json.dump(results, f, indent=1)
    paths = [jpath]
    svg_rel = None
    if summ["rows"]:  # the matrix chart; parts without the matrix have charts of their own
        with open(spath, "w") as f:
            f.write(svg(summ))
        paths.append(spath)
        svg_rel = os.path.relpath(spath, os.path.dirname(results_md))

    def part_chart(name, render):
        """The part's chart next to the JSON; its path relative to RESULTS.md."""
        path = os.path.join(out_dir, f"{base}-{name}.svg")
        with open(path, "w") as f:
            f.write(render(results))
        paths.append(path)
        return os.path.relpath(path, os.path.dirname(results_md))

    attack_rel = upgrade_rel = workers_rel = None
    if results.get("attack"):
        import attack

        attack_rel = part_chart("attack", attack.svg)
    if results.get("upgrade") and not results["upgrade"].get("skipped"):
        import upgrade

        upgrade_rel = part_chart("upgrade", upgrade.svg)
    if results.get("workers"):
        import workers

        workers_rel = part_chart("workers", workers.svg)
    md = markdown(results, summ, scal, svg_rel, attack_rel, upgrade_rel, workers_rel)
    new = not os.path.exists(results_md)
    with open(results_md, "a") as f:
        if new:
            f.write("# iamlet results\n\nEach run of `loadtest/run.sh` appends a section below; "
                    "raw JSON and charts are in `loadtest/results/`. Other benchmark sections "
                    "(control plane) are kept separate.\n\n")
        f.write("\n" + md)
    return paths + [results_md]

"""`python -m xenpv.stack.agent --guest YAML --qtest SOCK --ram FILE ...`: boot the guest and serve its console."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from xenpv.base.crashtrace import enable_crash_traces
from xenpv.base.errors import ConfigError
from xenpv.base.runrecord import RunRecordError, Schedule
from xenpv.guests.schema import load_guest
from xenpv.stack.agent import console
from xenpv.stack.agent.runtime import AgentConfig, GuestRuntime
from xenpv.stack.kernel import BugCheck
from xenpv.stack.notmodelled import NotModelled
from xenpv.stack.timescale import HarnessTooSlow, time_scale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xenpv.stack.agent")
    p.add_argument("--guest", required=True, type=Path)
    p.add_argument("--qtest", required=True, type=Path, help="QEMU's qtest socket")
    p.add_argument("--ram", required=True, type=Path, help="QEMU's RAM file")
    p.add_argument("--registry", required=True, type=Path, help="the guest's registry hive (persists across boots)")
    p.add_argument("--dump-dir", required=True, type=Path)
    p.add_argument("--transcript", required=True, type=Path, help="qtest transcript (appended)")
    p.add_argument("--hv", type=Path, help="xenhv's trap socket for this domain (absent: not a Xen guest)")
    p.add_argument("--domid", type=int)
    p.add_argument("--log", type=Path, help="the agent's own log")
    p.add_argument("--record", type=Path, help="the run record's journal to append console lines to "
                                               "(base.runrecord; its header written by the harness)")
    p.add_argument("--schedule", default="os", help="scheduling of deferred work: os (default) or seeded:SEED "
                                                     "(stack.kernel.schedule)")
    args = p.parse_args(argv)
    enable_crash_traces()  # a crash leaves every thread's Python stack on stderr (the process log)
    logging.basicConfig(filename=args.log, level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        time_scale()  # checked once up front: every deadline of the model reads it
    except ConfigError as exc:
        p.exit(2, f"{p.prog}: {exc}\n")
    try:
        schedule = Schedule.parse(args.schedule)
    except RunRecordError as exc:
        p.exit(2, f"{p.prog}: --schedule: {exc}\n")
    config = AgentConfig(load_guest(args.guest), args.qtest, args.ram, args.registry, args.dump_dir,
                         args.transcript, args.hv, args.domid, record=args.record, schedule=schedule)

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        rt = GuestRuntime.connect(config)
    except HarnessTooSlow as late:
        return console.too_slow(None, late, emit)
    try:
        try:
            rt.boot()
        except BugCheck as bugcheck:
            return console.stop(rt, bugcheck, emit)
        except HarnessTooSlow as late:
            return console.too_slow(rt, late, emit)
        except NotModelled as limit:
            return console.not_modelled(limit, emit)
        return console.run(rt)
    finally:
        try:
            rt.close()
        except Exception:  # the guest's own outcome (a bugcheck, say) must not be hidden by its cleanup
            logging.getLogger("stack.agent").exception("closing the guest runtime failed")


if __name__ == "__main__":
    sys.exit(main())

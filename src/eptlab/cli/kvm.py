"""``eptlab kvm NAME``: the applications on real hardware (/dev/kvm), shortcuts of ``eptlab run
kvm-NAME`` (files in out/kvm-NAME), and ``eptlab kvm info``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..errors import ConfigError

kvm_app = typer.Typer(
    help="Applications on real hardware through /dev/kvm (Linux; root or the kvm group).",
    no_args_is_help=True,
)

SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Parameter override KEY=VALUE (repeatable).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print {command, params, rows}.")]


def _command(name: str, doc: str) -> None:
    def command(set_: SetOption = None, as_json: JsonOption = False) -> int:
        return run_experiment(name, set_, as_json)

    command.__doc__ = doc + f" (= eptlab run kvm-{name})"
    kvm_app.command(name)(command)


_command("fork", "Copy-on-write snapshot and fork of a VM (memfd, MAP_PRIVATE clones).")
_command("dirty-log", "Dirty bitmap and dirty ring against trapping every write.")
_command("prefetch", "Populating a hinted range ahead of the guest against demand faults.")
_command("trap-rotation", "Rotating write traps over sampled memory to catch wild writes.")
_command("integrity", "A guest kernel's code watched three ways (trap code, trap all, dirty-log "
         "review) against injected writes, beside the simulator.")


def run_experiment(name: str, sets: list[str] | None, as_json: bool) -> int:
    """``eptlab kvm NAME`` as a shortcut of ``eptlab run kvm-NAME`` (files in out/kvm-NAME)."""
    from ..experiments import runner
    from .experiments import parse_sets

    try:
        result = runner.run(f"kvm-{name}", parse_sets(sets or []), show_progress=not as_json)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--set") from None
    if as_json:
        rows = json.loads(result.table.to_json(orient="records"))
        typer.echo(json.dumps({"command": name, "params": result.params, "rows": rows}))
    else:
        typer.echo(result.table.to_string(index=False))
    failed = name == "crosscheck" and not bool(result.table.equal.all())
    return 1 if failed else 0


@kvm_app.command("tsx")
def tsx(set_: SetOption = None, as_json: JsonOption = False) -> int:
    """RTM transactions in a guest (and in-process) under lazy, pre-faulted, dirty-logged and
    read-only memory: aborts by EAX status bit, the capacity limit (= eptlab run kvm-tsx)."""
    return run_experiment("tsx", set_, as_json)


@kvm_app.command("info")
def info(as_json: JsonOption = False) -> int:
    """Which KVM this is (module, TDP or shadow paging) and the capabilities eptlab uses."""
    from ..kvm import abi
    from ..kvm.backend import flavour
    from ..kvm.fds import Kvm

    with Kvm.open() as kvm:
        caps = {cap.name.lower(): kvm.check_extension(cap) for cap in abi.Cap}
    out = {**flavour().as_dict(), "label": flavour().label, "capabilities": caps}
    if as_json:
        typer.echo(json.dumps(out))
    else:
        for key, value in out.items():
            typer.echo(f"{key}: {value}")
    return 0


@kvm_app.command("crosscheck")
def crosscheck(set_: SetOption = None, as_json: JsonOption = False) -> int:
    """The same access patterns and transaction streams through the simulator and KVM,
    compared; exit status 1 when a row differs (= eptlab run kvm-crosscheck)."""
    return run_experiment("crosscheck", set_, as_json)

"""`runner watch`: apply again whenever the specs or the files they read change, once they settle.

For post-ride batches: the videos of a ride are copied into a source folder over minutes, and the
apply should start once, after the last one is complete, not on the first file.

What is watched (:func:`watched_roots`): the spec files and folders named on the command line (a
new spec in a folder counts), and from each apply's plan every ``FileSetRef`` root its nodes read,
every dataset source folder (a video folder still empty has no node reading it yet) and each
spec's review file (`runner review` decisions are read into stage configs). Each poll takes a
cheap stat signature of them (:func:`signature`: names, sizes and mtimes from an ``os.scandir``
walk, read the way the runner reads folders, :func:`runner.paths.iter_tree`; nothing is hashed).
When it differs from the one the last apply started from, the watch waits until it has stayed
unchanged for ``settle_s`` (a file still being copied keeps changing size), then applies.

An apply that fails (a stage failure, a budget refusal, a spec broken by an edit) is reported by
the apply function; a refusal (any :class:`UserError`) is printed here; either way the watch goes
on, and the next change triggers the next apply. A workspace locked by another apply is the
exception: the change stays pending, and the watch tries again after the next poll and settle.
The first pass applies once at start. Ctrl-C ends the watch (an apply in flight stops the way
`runner apply` does on Ctrl-C).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from runner.core.errors import UserError
from runner.engine.lock import LockHeld
from runner.paths import glob_walks_folders, iter_tree, split_glob

# The one place for the defaults (`runner watch --interval/--settle` show these).
DEFAULT_INTERVAL_S = 5.0
DEFAULT_SETTLE_S = 10.0


@dataclass(frozen=True)
class Root:
    """A file or folder the watch polls (a folder's sub-folders too when ``recursive``)."""

    path: Path
    recursive: bool = True


@dataclass(frozen=True)
class WatchSettings:
    interval_s: float = DEFAULT_INTERVAL_S
    settle_s: float = DEFAULT_SETTLE_S
    max_applies: int | None = None  # stop after this many applies (the first pass counts)


@dataclass
class Clock:
    """Time for the loop; tests pass a fake one."""

    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


# ----------------------------------------------------------------------------- what to watch


def watched_roots(spec_args: list[str | Path], plan: Any = None) -> list[Root]:
    """The spec arguments (a folder: its own entries only), and, given the last apply's plan,
    every file-set root its nodes read, every dataset source folder of its specs and their review
    files; a root inside a recursive one is left out."""
    roots = [Root(Path(a).absolute(), recursive=False) for a in spec_args]
    if plan is not None:
        from runner.review.decisions import review_path

        roots += _input_roots(plan.graph.nodes.values())
        for spec in plan.graph.specs.values():  # the review file is read into stage configs
            roots += [*_source_roots(spec), Root(review_path(spec.file).absolute(), recursive=False)]
    return _minimal(roots)


def _input_roots(nodes: Any) -> list[Root]:
    from runner.core.contract import FileSetRef

    return [Root(Path(ref.root).absolute(), ref.recursive) for node in nodes for ref in node.inputs.values()
            if isinstance(ref, FileSetRef)]


def _source_roots(spec: Any) -> list[Root]:
    """Each dataset source's folder or file (a glob: the folder it starts in, walked whole)."""
    out = []
    for source in spec.config.dataset.sources:
        value = source.images or source.video
        if not value:
            continue
        path = spec.abspath(value)
        glob = None if os.path.lexists(path) else split_glob(value)  # as runner.stages.common lists it
        if glob is not None:
            out.append(Root(spec.abspath(glob[0] or "."), recursive=glob_walks_folders(glob[1])))
        else:
            out.append(Root(path, source.recursive))
    return out


def _minimal(roots: list[Root]) -> list[Root]:
    """Each path once (recursive wins), without the roots a folder root already walks: anything
    under a recursive folder, a file directly in any folder."""
    unique = sorted(set(roots), key=lambda r: (str(r.path), not r.recursive))
    deep = {r.path for r in unique if r.recursive}
    folders = {r.path for r in unique if os.path.isdir(r.path)}
    kept: list[Root] = []
    for r in unique:
        covered = (r.path.parent in folders and r.path not in folders) or any(d in deep for d in r.path.parents)
        if not covered and not any(k.path == r.path for k in kept):  # recursive sorts first
            kept.append(r)
    return kept


# ----------------------------------------------------------------------------- signatures

Signature = dict[Root, tuple]


def root_signature(root: Root) -> tuple:
    """(relative path, size, mtime_ns) of every file under ``root`` (``root`` itself when a file);
    ``()`` when it does not exist. Hidden names are skipped, as the scanner skips them."""
    try:
        st = os.stat(root.path)
    except OSError:
        return ()
    if not os.path.isdir(root.path):
        return (("", st.st_size, st.st_mtime_ns),)
    out = []
    for rel, entry in iter_tree(root.path, root.recursive):
        try:
            if entry.is_file(follow_symlinks=True):
                est = entry.stat(follow_symlinks=True)
                out.append((rel, est.st_size, est.st_mtime_ns))
        except OSError:
            continue
    return tuple(sorted(out))


def signature(roots: list[Root]) -> Signature:
    return {r: root_signature(r) for r in roots}


def describe_change(old: Signature, new: Signature) -> str:
    """``photos (1 added)``, ``specs (1 changed)``, ...: what differs, per root."""
    parts = []
    for root, entries in new.items():
        before = {e[0]: e[1:] for e in old.get(root, ())}
        after = {e[0]: e[1:] for e in entries}
        counts = {"added": len(after.keys() - before.keys()), "removed": len(before.keys() - after.keys()),
                  "changed": sum(1 for k in after.keys() & before.keys() if after[k] != before[k])}
        words = ", ".join(f"{n} {w}" for w, n in counts.items() if n)
        if words:
            parts.append(f"{_shown(root.path)} ({words})")
    return "; ".join(parts[:3]) + (f"; {len(parts) - 3} more" if len(parts) > 3 else "") or "files changed"


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd())) or "."
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- the loop


@dataclass
class Watch:
    """The polling loop. ``apply_fn(on_plan)`` runs one apply and prints its result, calling
    ``on_plan(plan)`` before anything runs (the executor's hook: the plan says what to watch);
    it returns the :class:`runner.engine.executor.ApplyResult` or raises a :class:`UserError`
    (printed here; the watch goes on). ``echo(text, err=False)`` prints a line (``err``: to
    stderr)."""

    spec_args: list[str]
    apply_fn: Callable[[Callable[[Any], None]], Any]
    settings: WatchSettings = field(default_factory=WatchSettings)
    clock: Clock = field(default_factory=Clock)
    echo: Callable[..., None] = field(default=lambda text, err=False: print(text, file=sys.stderr if err else None))
    applies: int = field(default=0, init=False)
    applying: bool = field(default=False, init=False)
    roots: list[Root] = field(default_factory=list, init=False)
    baseline: Signature = field(default_factory=dict, init=False)

    def run(self) -> int:
        """Apply now, then on every settled change, until ``max_applies`` or Ctrl-C; the number
        of applies."""
        try:
            self.roots = watched_roots(self.spec_args)
            self.apply(signature(self.roots))
            while not self.done():
                settled = self.settle(self.wait_for_change())
                if settled == self.baseline:
                    self.echo("everything is back as it was: nothing to apply")
                    continue
                self.apply(settled)
        except KeyboardInterrupt:
            if self.applying:
                self.echo("interrupted: finished stages are kept; the next apply continues from there", err=True)
            self.echo(f"watch stopped (Ctrl-C) after {self.applies} apply(s)")
        return self.applies

    def done(self) -> bool:
        return self.settings.max_applies is not None and self.applies >= self.settings.max_applies

    def wait_for_change(self) -> Signature:
        self.echo(f"watching {len(self.roots)} path(s) every {self.settings.interval_s:g}s "
                  f"(settle {self.settings.settle_s:g}s); Ctrl-C to stop")
        while True:
            self.clock.sleep(self.settings.interval_s)
            current = signature(self.roots)
            if current != self.baseline:
                self.echo(f"change: {describe_change(self.baseline, current)}; applying once it is unchanged "
                          f"for {self.settings.settle_s:g}s")
                return current

    def settle(self, current: Signature) -> Signature:
        """Poll until ``current`` has not changed for ``settle_s``; the settled signature."""
        stable_since = self.clock.now()
        while (left := self.settings.settle_s - (self.clock.now() - stable_since)) > 0:
            self.clock.sleep(min(self.settings.interval_s, left))
            latest = signature(self.roots)
            if latest != current:
                current, stable_since = latest, self.clock.now()
        return current

    def apply(self, started_from: Signature) -> None:
        """One apply. The next poll compares against the signature it started from (and, for a
        root its plan adds, the one at planning time), so what arrives during it is seen."""
        self.applies += 1
        previous, self.baseline, self.applying = self.baseline, dict(started_from), True
        try:
            result = self.apply_fn(self.planned)
        except LockHeld as exc:  # another apply holds the workspace: the change is still to apply
            self.echo(exc.render(), err=True)
            self.echo("the workspace is busy; the watch tries again once it is free", err=True)
            self.baseline = previous
            return
        except UserError as exc:
            self.echo(exc.render(), err=True)
            self.echo("apply refused; the watch goes on and applies on the next change", err=True)
            return
        finally:
            self.applying = False
        if result.failed:
            self.echo(f"{len(result.failed)} stage(s) failed; the watch goes on and applies on the next change",
                      err=True)

    def planned(self, plan: Any) -> None:
        """The apply's plan, before anything runs: watch what it reads from now on."""
        self.roots = watched_roots(self.spec_args, plan)
        self.baseline = {r: self.baseline[r] if r in self.baseline else root_signature(r) for r in self.roots}

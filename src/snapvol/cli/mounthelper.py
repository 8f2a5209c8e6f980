"""`mount.fuse.snapvol`: the helper mount(8) runs for a `fuse.snapvol` file system, so an
fstab line mounts a volume at boot (and `mount /mnt/vol`, `mount -a` work):

    /srv/vol.img  /mnt/vol  fuse.snapvol  defaults  0  0

mount(8) calls it as `mount.fuse.snapvol SPEC DIR [-sfnv] [-o OPTIONS]` (only from /sbin:
`make install-bin` puts it there) after dropping the options it handles itself (noauto,
x-systemd.*, comment=...). The helper turns OPTIONS into `snapvol mount` options and
runs that mount, which returns once the mount answers requests. Exit codes are mount(8)'s:
0 mounted, 1 a bad invocation or option, 32 the mount failed (its one-line reason on
stderr).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import click

EXIT_USAGE = 1  # mount(8): incorrect invocation or permissions
EXIT_FAILED = 32  # mount(8): mount failure

# Options with no effect on a snapvol mount, accepted so an fstab line may carry them:
# mount(8)'s and systemd's own (they are usually dropped before the helper runs, but
# `-s`-less callers and older versions pass some on), the defaults, and the access-time
# options (snapvol never updates access times on reads: it behaves as noatime anyway).
IGNORED = frozenset({
    "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail",
    "_netdev", "suid", "dev", "exec", "async", "atime", "noatime", "diratime",
    "nodiratime", "relatime", "norelatime", "strictatime", "nostrictatime", "lazytime",
    "nolazytime", "loud", "silent", "rw",
})
IGNORED_PREFIXES = ("x-", "comment=")
FLAGS = ("nosuid", "nodev", "noexec")  # given to the kernel (snapvol mount --kernel-flags)
VALUED = {"cp_interval": "--cp-interval", "readahead": "--readahead"}


class OptionError(ValueError):
    """An option the helper does not know (or one without its value)."""


@dataclass(slots=True)
class Translated:
    args: list[str] = field(default_factory=list)  # `snapvol mount` options
    ignored: list[str] = field(default_factory=list)


def translate(options: str, sloppy: bool = False) -> Translated:
    """mount(8)'s comma-separated OPTIONS as `snapvol mount` options. An unknown option is
    an OptionError naming it and the known ones, unless `sloppy` (mount -s): then it is
    ignored, as are the options in IGNORED."""
    out = Translated()
    flags = []
    for opt in (o.strip() for o in options.split(",")):
        if not opt:
            continue
        key, eq, value = opt.partition("=")
        if opt == "ro":
            out.args.append("--read-only")
        elif opt == "allow_other":
            out.args.append("--allow-other")
        elif opt in FLAGS:
            flags.append(opt)
        elif key in VALUED:
            if not eq or not value:
                raise OptionError(f"mount option {key} needs a value ({key}=N)")
            out.args += [VALUED[key], value]
        elif opt in IGNORED or opt.startswith(IGNORED_PREFIXES) or sloppy:
            out.ignored.append(opt)
        else:
            raise OptionError(
                f"unknown mount option {opt!r}: snapvol takes ro, rw, allow_other, "
                f"cp_interval=SECONDS, readahead=KIB, {', '.join(FLAGS)}, and the ones "
                "mount(8) and systemd handle (noauto, nofail, _netdev, x-systemd.*)")
    if flags:
        out.args += ["--kernel-flags", ",".join(flags)]
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("spec", metavar="IMAGE")
@click.argument("directory", metavar="DIR")
@click.option("-o", "options", default="", metavar="OPTIONS",
              help="Comma-separated mount options: ro, rw, allow_other, cp_interval=SECONDS, "
                   "readahead=KIB, nosuid, nodev, noexec; defaults, noauto, nofail, _netdev, "
                   "x-* and the access-time options are accepted and change nothing.")
@click.option("-s", "sloppy", is_flag=True, help="Ignore options the helper does not know.")
@click.option("-f", "fake", is_flag=True,
              help="Do everything but mount: print the snapvol command it would run.")
@click.option("-n", "no_mtab", is_flag=True, help="Accepted (there is no /etc/mtab to write).")
@click.option("-v", "verbose", is_flag=True, help="Print the snapvol command before running it.")
@click.option("-t", "fstype", metavar="TYPE", help="Accepted: fuse.snapvol.")
def helper(spec: str, directory: str, options: str, sloppy: bool, fake: bool, no_mtab: bool,
           verbose: bool, fstype: str | None) -> None:
    """Mount a snapvol volume from /etc/fstab: mount(8)'s helper for fuse.snapvol.

    For an fstab line `IMAGE DIR fuse.snapvol OPTIONS 0 0` (or `mount -t fuse.snapvol
    -o OPTIONS IMAGE DIR`) mount(8) runs this helper, which runs `snapvol mount IMAGE DIR`
    with the options translated: ro: --read-only, allow_other: --allow-other,
    cp_interval=S: --cp-interval S, readahead=KIB: --readahead KIB, nosuid, nodev,
    noexec: --kernel-flags. It returns once the mount answers requests. Exit 0 when
    mounted, 1 for a bad invocation or option, 32 when the mount fails."""
    if fstype is not None and fstype not in ("fuse.snapvol", "snapvol"):
        raise click.UsageError(f"-t {fstype}: this helper mounts fuse.snapvol only")
    try:
        translated = translate(options, sloppy)
    except OptionError as err:
        raise click.UsageError(str(err)) from None
    argv = ["mount", spec, directory, *translated.args]
    if verbose or fake:
        click.echo("snapvol " + " ".join(argv), err=True)
    if fake:
        return
    from snapvol.cli.main import main

    try:
        main(argv)
    except SystemExit as done:
        if done.code not in (0, None):
            sys.exit(EXIT_FAILED)


def main(argv: list[str] | None = None) -> None:
    """Run the helper with mount(8)'s exit codes."""
    try:
        helper.main(args=argv, prog_name="mount.fuse.snapvol", standalone_mode=False)
    except click.ClickException as err:
        click.echo(f"mount.fuse.snapvol: {' '.join(err.format_message().splitlines())}",
                   err=True)
        sys.exit(EXIT_USAGE)
    except click.exceptions.Abort:
        sys.exit(EXIT_FAILED)
    sys.exit(0)


if __name__ == "__main__":
    main()

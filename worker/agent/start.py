"""Starting the agent from its zipapp: ``python3 -u agent.pyz`` runs the archive's
``__main__.py``, which calls ``run`` (``toolq.worker.backends.agent_app`` builds
the archive)."""

from __future__ import annotations

import sys
import zipimport


class CompileOnce(zipimport.zipimporter):
    """zipimport, minus a second compile of every module: its ``get_filename``
    (asked for a module's spec) compiles the module's source only to learn which
    file it came from, then the import compiles it again."""

    def get_filename(self, fullname):
        tail = "/__init__.py" if self.is_package(fullname) else ".py"
        name = fullname.rpartition(".")[2]
        return "%s/%s%s%s" % (self.archive, self.prefix, name, tail)


#: How a failed ``--seed-home`` starts its line on stderr (the worker looks for it).
SEED_FAILED = "toolq agent: copying the image's home in failed"


def seed_home(argv):
    """``--seed-home TAR DIR``: the image's home directory (a tar the worker put
    beside the agent) into its empty tmpfs, as the sandbox user, before the agent
    says it is ready: one exec and one Python start fewer per container start."""
    if len(argv) < 4 or argv[1] != "--seed-home":
        return
    import tarfile

    kw = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
    try:
        with tarfile.open(argv[2]) as tar:  # the image's own files, read by the worker
            tar.extractall(argv[3], **kw)
    except Exception as exc:  # the worker reports this with the start's failure
        sys.stderr.write("%s into %s: %s\n" % (SEED_FAILED, argv[3], exc))
        sys.exit(3)


def run():
    """Seed the home if asked; import the agent's modules through ``CompileOnce``,
    then run its main loop."""
    seed_home(sys.argv)
    sys.path_hooks.insert(0, CompileOnce)
    sys.path_importer_cache.clear()  # the archive's own importer was made already
    from .loop import main

    main()

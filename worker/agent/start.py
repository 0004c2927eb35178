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


def run():
    """Import the agent's modules through ``CompileOnce``, then run its main loop."""
    sys.path_hooks.insert(0, CompileOnce)
    sys.path_importer_cache.clear()  # the archive's own importer was made already
    from .loop import main

    main()

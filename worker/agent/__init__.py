"""toolq in-sandbox agent: one long-lived process per sandbox.

Stdlib only, Python >= 3.8: it runs inside arbitrary images (and as a
subprocess of the local backend), so that every backend has the same tool
semantics. It is shipped as one file, a zipapp the worker builds from this
package (``toolq.worker.backends.agent_app``), and run as ``python3 -u
agent.pyz``. Modules import each other relatively, and nothing outside the
standard library.

Protocol (JSON lines on stdin/stdout, ``protocol.py``): the worker sends
frames of requests ``{"id", "op", "slot", ...}`` with ``op`` in ``init | call
| cancel | drop | ping``. ``call`` requests of one slot run in order;
different slots run concurrently; ``cancel``/``drop``/``ping`` act at once.
The agent answers each request with one line, and sends events (background
tasks) unasked.

The modules, from the bottom up:

- ``protocol``: the channel's framing; ``ToolError`` and error replies
- ``procs``: output capture, running commands, process groups and trees
- ``slot``: a workspace and the thread that runs its calls; paths inside it
- ``files``, ``editor``: read, write, edit and list files; ``str_replace_editor``
- ``archives``, ``snapshots``: tar.gz in and out; whole workspaces as one blob
- ``background``: background tasks and their events
- ``shell``: ``bash`` and persistent ``shell`` sessions
- ``keys``, ``terminals``: programs on a pseudo-terminal, driven by keystrokes
- ``tools``: every tool by name
- ``loop``: the main loop: dispatch, init / cancel / drop, the calls' replies
- ``start``: how the zipapp starts it (``__main__.py``: ``python -m`` on the package)
"""

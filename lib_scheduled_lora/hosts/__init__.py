"""Host adapters: one module per host, each implementing the interface of
:mod:`lib_scheduled_lora.core.session` (``HostAdapter`` + the runtime's scopes).

Everything here is pure Python against duck-typed host objects, so that it is unit-tested without
a WebUI (``tests/test_host_*.py`` replay the hosts' call orders with real torch weights). The files
under ``scripts/`` only import the host's modules and hand them to these classes.

* :mod:`.diffusers` - a diffusers pipeline (library use; the ``generate`` and ``demo`` commands);
  :mod:`.runner` - one generation from a prompt, and :mod:`.samplers` - WebUI sampler names;
* :mod:`.a1111` - AUTOMATIC1111 v1.10 (the hooks and wrappers ``scripts/`` installs);
* shared by the WebUI adapters: :mod:`.ownership` - which tags the host's own Lora keeps and which
  we take, validation before sampling, the batch warning; :mod:`.xyz` - the XYZ-grid axes' prompt
  rewriting; :mod:`.plot` - the multiplier plot.
"""

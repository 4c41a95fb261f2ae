"""Host adapters: the WebUI-independent half of every WebUI integration.

Everything here is pure Python against duck-typed host objects, so that it is unit-tested without
a WebUI (``tests/test_host_*.py``). The files under ``scripts/`` only import the host's modules and
hand them to these classes.

* :mod:`.positions` - which step of the schedule a model evaluation is, from the sampler's own
  noise grid (never from the host's lagging step counter);
* :mod:`.plan` - which tags the host's own Lora extension keeps (plain ones) and which we take
  (scheduled ones), validation before sampling, and the batch-consistency warning;
* :mod:`.session` - the :class:`HostAdapter` interface every host implements, and the runtime that
  scopes the weight engine to exactly the host calls that need it (conditioning, one sampling pass);
* :mod:`.a1111` - AUTOMATIC1111 v1.10 (the hooks and wrappers the ``scripts/`` file installs);
* :mod:`.xyz` - the XYZ-grid axes' prompt rewriting; :mod:`.plot` - the multiplier plot.
"""

"""sandbox-oci: an OCI runtime with runc's command line (SPEC §12).

A second front end to the same executor as the Python API (DESIGN §5): a
bundle's config.json becomes a mount plan (sandbox/_native_api.MountOp) plus
an OciPlan and goes to csrc/clone.c sbx_start; exec goes through sbx-exec.

Kept lean on purpose: every containerd call is a new process, so `state`,
`kill`, `list` import only cli.py and state.py.
"""

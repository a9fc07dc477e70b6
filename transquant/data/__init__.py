"""The tasks: GLUE-style sentence pairs from the hub, and the packaged offline task (see ``NOTICE.md``)."""

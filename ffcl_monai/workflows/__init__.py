"""Running bundle workflows: how outside input (requests, datalist headers) may reach a config (:mod:`.untrusted`)."""

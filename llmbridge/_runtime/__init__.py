"""Process-wide runtime: the background event loop (:mod:`.loop`), the one fork hook
(:mod:`.fork`), bounded thread and process offload (:mod:`.offload`,
:mod:`.processes`) and Flask's async views on the loop (:mod:`.flask_async`)."""

"""Privacy audit: attacks that measure what updates and models leak, and checks of the DP machinery.

Accounting (epsilon) is a bound; this package runs the attacks a curious server or a model
user could run, so a reader sees them fail (or succeed, without DP):

* ``attacks``: attribute (gender) inference from updates, sample- and speaker-level membership
  inference, ROC summaries. Pure computation over arrays (scikit-learn).
* ``protocol``: the run's protocol read from a run directory, and updates produced under it with
  the code the two sides run (the device's ``fedser.client.update.train_round``, the server's
  ``fedser.server.aggregation.aggregate``).
* ``dpchecks``: empirical checks that sent updates are clipped, that the noise has the std the
  settings promise, and that a device ledger's epsilon matches an independent recomputation.
* ``inputs``: the speaker-gender table (RAVDESS, EmoDB, user CSV) and run-directory loading.
* ``report`` / ``runner``: ``fedser audit RUN_DIR --data PATH --out DIR``.
"""

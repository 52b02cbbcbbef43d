"""bnn_course: the companion package of the book *Bayesian CNNs with Flipout*.

Modules, in the order the book introduces them:

* :mod:`bnn_course.posterior` — a factorised Gaussian over a weight tensor (chapter 1);
* :mod:`bnn_course.elbo` — the ELBO and Bayes by Backprop on a 1-D toy (chapter 2);
* :mod:`bnn_course.flipout` — the Flipout estimator as functions (chapters 3 and 4);
* :mod:`bnn_course.layers` — ``BayesianDenseFlipout`` and ``BayesianConv2dFlipout``;
* :mod:`bnn_course.models` — the ``BayesianCNN`` (chapter 5);
* :mod:`bnn_course.config`, :mod:`bnn_course.seeding`, :mod:`bnn_course.provenance` —
  run mode and budgets, seeds, and the provenance line of every notebook.
"""

__version__ = "0.1.0"

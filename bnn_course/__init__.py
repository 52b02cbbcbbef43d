"""bnn_course: the companion package of the book *Bayesian CNNs with Flipout*.

Modules, in the order the book introduces them:

* :mod:`bnn_course.posterior` — a factorised Gaussian over a weight tensor (chapter 1);
* :mod:`bnn_course.weight_noise` — signal and noise of sampled layers (chapter 1);
* :mod:`bnn_course.elbo` — the ELBO and Bayes by Backprop on a 1-D toy (chapter 2);
* :mod:`bnn_course.flipout` — the Flipout estimator as functions (chapters 3 and 4);
* :mod:`bnn_course.gradient_variance` — shared, Flipout and independent estimators (chapter 3);
* :mod:`bnn_course.conv_noise` — the spatial noise structure of conv estimators (chapter 4);
* :mod:`bnn_course.layers` — ``BayesianDenseFlipout`` and ``BayesianConv2dFlipout``;
* :mod:`bnn_course.models` — the ``BayesianCNN`` and its deterministic twin (chapter 5);
* :mod:`bnn_course.inspection` — shapes, parameter and KL accounting (chapter 5);
* :mod:`bnn_course.data`, :mod:`bnn_course.evaluation`, :mod:`bnn_course.train` — CIFAR-10
  on the device, Monte Carlo prediction, the training engine and its CLI (chapter 6);
* :mod:`bnn_course.diagnostics` — what reveals a Bayesian network that does not learn
  (chapter 7);
* :mod:`bnn_course.uncertainty`, :mod:`bnn_course.metrics`, :mod:`bnn_course.corruptions`,
  :mod:`bnn_course.ood`, :mod:`bnn_course.comparison` — what the uncertainty is good for
  (chapter 8);
* :mod:`bnn_course.config`, :mod:`bnn_course.seeding`, :mod:`bnn_course.provenance`,
  :mod:`bnn_course.notebook` — run mode and budgets, seeds, provenance, notebook helpers.
"""

__version__ = "0.1.0"

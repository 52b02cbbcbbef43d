"""Write book/09_is_it_a_posterior.ipynb from the cell texts below (without outputs).

Kept beside the notebook so that its prose and code can be edited as plain text and
reviewed in a diff; run ``python .ci/make_ch9.py`` after an edit, then execute the notebook
(README: "Executing the book in full mode") to give it outputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CELLS: list[tuple[str, str]] = []


def md(text: str) -> None:
    CELLS.append(("markdown", text.strip("\n")))


def code(text: str) -> None:
    CELLS.append(("code", text.strip("\n")))


md(r"""
# Chapter 9: Is it a posterior?

**The question.** Chapter 6 trained a BayesianCNN and chapter 8 used its uncertainty. But
is what Bayes by Backprop returned a *posterior*, the distribution that maximises the
ELBO, or only where the optimiser happened to stop? And if we make the optimisation
converge, does the Bayesian network then earn its keep against a deterministic network that
is simply calibrated after training?

**The picture it ends with.** One table: six ways of getting probabilities from the book's
CNN (chapter 6's recipe, a recipe that lets $\sigma$ converge, the natural-gradient learner
IVON, the deterministic twin, the twin with a temperature, the twin with a Laplace
approximation of its last layer), scored on accuracy, NLL, Brier score, calibration,
out-of-distribution detection and corrupted images, each variational one with its
negative ELBO and its verdict: *converged*, *held back by the step size*, or *still
moving*.

The chapter has three parts:

1. **Ground truth.** A model whose best mean-field posterior is known in closed form,
   Bayesian linear regression, on which we watch each learner approach (or not approach)
   that optimum.
2. **Convergence on CIFAR-10.** A check, made from a run's history, of whether each
   layer's $\sigma$ stopped where the ELBO wants it or where Adam's step budget left it;
   first for chapter 6's network, then for the two learners that should do better.
3. **Does it earn its keep?** The six contenders on the same test images, with paired
   standard errors, and the targets a posterior worth having should meet.

As in chapters 6-8, full mode has a GPU tier and a CPU tier (`bnn_course.config.tier`);
both use chapter 6's training budget of the same tier and reuse chapter 6's two networks
when they are there.
""")

code(r"""
# In Colab, install the companion package; elsewhere this cell does nothing.
import subprocess
import sys

if "google.colab" in sys.modules:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet",
         "bnn-course @ git+https://github.com/bnn-course/bnn-course"],
        check=True,
    )
""")

code(r"""
%matplotlib inline
import dataclasses
import json
import math
import time
from importlib import resources
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

import bnn_course.ground_truth as ground_truth
from bnn_course.calibration import TemperatureScaled, fit_temperature
from bnn_course.chapter_runs import posterior_configs
from bnn_course.comparison import reusable_checkpoint, verdict
from bnn_course.config import budget, budget_name
from bnn_course.convergence import convergence_report
from bnn_course.data import load_cifar10, stratified_subset
from bnn_course.evaluation import evaluate, predict_log_probs
from bnn_course.ivon import IVON
from bnn_course.laplace import fit_last_layer_laplace, laplace_summary
from bnn_course.notebook import glue, glue_text, show_source, use_book_style
from bnn_course.ood import load_ood_sets
from bnn_course.posteriors import (
    Contender,
    negative_elbo_estimate,
    paired_comparison,
    paired_ece_difference,
    scorecard,
    target_checks,
)
from bnn_course.provenance import device_description, provenance_line
from bnn_course.seeding import seed_everything
from bnn_course.train import (
    CHECKPOINT_NAME,
    learning_rates,
    load_trained_model,
    select_device,
    set_aside_other_data,
    train,
    training_set,
    validation_set,
)

use_book_style()
chapter_started = time.perf_counter()
b = budget("posterior")
tier = budget_name("posterior")
configs = posterior_configs()
device = select_device("auto")
data = load_cifar10(smoke=None, device=device)
print(provenance_line(data=data.name, device=device))
print(f"device: {device_description(device)}")
print(f"data:   {data.source}")
print(b)
""")

md(r"""
## Part 1: a posterior we know

### The model

Bayesian linear regression with known noise is the one model of this book whose posterior
we can write down. With $N$ examples $x_n \in \mathbb{R}^d$, the likelihood
$y_n \sim \mathcal{N}(x_n^\top w, \sigma_n^2)$ and the prior $w \sim \mathcal{N}(0, s^2 I)$,
the posterior is Gaussian:

$$
p(w \mid \mathcal{D}) = \mathcal{N}\big(\mu^\star, \Lambda^{-1}\big), \qquad
\Lambda = \frac{X^\top X}{\sigma_n^2} + \frac{I}{s^2}, \qquad
\mu^\star = \Lambda^{-1} \frac{X^\top y}{\sigma_n^2}.
$$ (gt-posterior)

Our networks do not use a full Gaussian, but a *mean-field* one,
$q(w) = \prod_i \mathcal{N}(\mu_i, \sigma_i^2)$, and the ELBO of chapter 2 picks the best of
those. For this model the best one is also known {cite:p}`bishop2006pattern`:

$$
\mu_i = \mu^\star_i, \qquad \sigma_i^2 = \frac{1}{\Lambda_{ii}} .
$$ (gt-mean-field)

The means are exact; the widths are those of the conditional distribution of each weight
given all the others, which is *narrower* than its marginal $(\Lambda^{-1})_{ii}$ whenever
the features are correlated. That is a property of the mean-field family, not a failure of
any optimiser: {eq}`gt-mean-field` is the target a variational learner should reach, and
the question of this part is whether it does.

`make_problem` draws `b.regression_examples` examples with `b.regression_features`
correlated features whose scales range over a factor of 50, so that the optimal
$\sigma_i$ span more than a decade too. The next cell computes {eq}`gt-posterior` and
{eq}`gt-mean-field` and checks the claim about the marginals.
""")

code(r"""
problem = ground_truth.make_problem(b.regression_examples, b.regression_features, seed=0)
optimum_mean, optimum_std = ground_truth.mean_field_optimum(problem)
exact_mean, precision = ground_truth.exact_posterior(problem)
marginal_std = torch.linalg.inv(precision).diagonal().sqrt()
scales = problem.inputs.std(0)
print(pd.DataFrame({
    "feature scale": scales.numpy(),
    "posterior mean": optimum_mean.numpy(),
    "mean-field sigma (optimum)": optimum_std.numpy(),
    "exact marginal std": marginal_std.numpy(),
}).round(4).to_string())
assert torch.allclose(optimum_mean, exact_mean)
assert (optimum_std < marginal_std).all()  # mean-field is narrower with correlated inputs
glue("ch9_gt_sigma_min", optimum_std.min().item())
glue("ch9_gt_sigma_max", optimum_std.max().item())
glue("ch9_gt_narrowest_ratio", (optimum_std / marginal_std).min().item())
glue("ch9_gt_examples", problem.num_examples)
glue("ch9_gt_features", problem.num_features)
""")

md(r"""
On these {glue:text}`ch9_gt_examples:,` examples with {glue:text}`ch9_gt_features`
features, every optimal width is below the exact marginal standard deviation, down to
{glue:text}`ch9_gt_narrowest_ratio:.2f` of it. The optimal widths run from
{glue:text}`ch9_gt_sigma_min:.3f` to {glue:text}`ch9_gt_sigma_max:.2f`: all far above the
book's initial $\sigma = e^{-5} \approx 0.0067$.

### Three learners

- **The book's recipe**: chapter 6's recipe, Adam on the per-example negative ELBO,
  learning rate $10^{-3}$ cosine-annealed to zero, every $\log\sigma$ starting at $-5$. The
  model is the book's own `BayesianDenseFlipout` layer ($d$ inputs, one output, no bias).
- **Sigma-aware**: the same, but the $\sigma$ parameters in their own Adam group with
  ten times the learning rate (`sigma_lr_factor`, chapter 7's run I). Chapter 6 showed why
  this should matter: Adam moves $\log\sigma$ by at most about one learning rate per step,
  so over $T$ steps by at most $\sum_t \eta_t$, and less when the sampled gradients are
  noisy.
- **IVON** {cite:p}`shen2024variational`: natural-gradient variational learning. It keeps
  no $\sigma$ parameter at all, but an online estimate $h$ of the expected diagonal Hessian
  of the mean loss, and reads $\sigma = 1/\sqrt{N(h + \delta)}$ off it. With
  $\delta = 1/(N s^2)$, $N(h + \delta) = Nh + 1/s^2$: the data's curvature plus the
  prior's precision, which for this model is exactly $\Lambda_{ii}$, the optimum
  {eq}`gt-mean-field`. The next two cells print how it estimates $h$ and how it updates,
  written from the paper's Algorithm 1.
""")

code(r"""
show_source(IVON._accumulate)
""")

code(r"""
show_source(IVON._update)
""")

md(r"""
In the symbols of the code: `_accumulate` turns the gradient $\hat g$ at a sampled $\theta =
m + \sigma\varepsilon$ into the Hessian estimate $\hat h = \hat g \odot (\theta -
m)/\sigma^2 = \hat g \odot \varepsilon / \sigma$; in `_update`, $g$ averages the $\hat g$
(momentum `beta1`), $h$ averages the $\hat h$ (rate `beta2`, with a correction that keeps $h
+ \delta$ positive), and the means take a Newton-like step $(\bar g + \delta m)/(h +
\delta)$, each element clipped to $\pm$`clip_radius` and scaled by $\alpha (h_0 + \delta)$.
There is no step bound on $\sigma$; instead $h$ forgets its initial value $h_0$ at the rate
`beta2`: after $T$ steps $h_0$ still weighs $\beta_2^T$. The settings of all three learners
are in `ground_truth.REGRESSION_LEARNERS`; each runs `b.regression_steps` steps on
mini-batches of 100, and every 100 steps we measure the worst relative error of a width,
$\max_i |\sigma_i/\sigma_i^\star - 1|$, and the worst error of a mean in units of its
optimal width, $\max_i |\mu_i - \mu_i^\star|/\sigma_i^\star$.
""")

code(r"""
print(pd.DataFrame(ground_truth.REGRESSION_LEARNERS).T.to_string())
regression = ground_truth.fit_learners(problem, steps=b.regression_steps,
                                       record_every=b.regression_record_every)

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for name, trajectory in regression.items():
    axes[0].plot(trajectory.steps, trajectory.sigma_error, label=name)
    axes[1].plot(trajectory.steps, trajectory.mean_error, label=name)
axes[0].axhline(0.05, color="gray", ls=":", label="5%")
axes[0].set(yscale="log", xlabel="step", ylabel=r"$\max_i |\sigma_i / \sigma_i^\star - 1|$",
            title="Widths: distance to the mean-field optimum")
axes[1].set(yscale="log", xlabel="step",
            ylabel=r"$\max_i |\mu_i - \mu_i^\star| / \sigma_i^\star$",
            title="Means: distance to the optimum")
for ax in axes:
    ax.legend(fontsize=8)
fig.suptitle(f"Bayesian linear regression, N = {problem.num_examples:,}, "
             f"d = {problem.num_features} (ground truth in closed form)")
fig.tight_layout()
plt.show()

final = pd.DataFrame({name: t.final for name, t in regression.items()}).T
print(final.round(4).to_string())
book_traj = regression["book's recipe"]
book_bound = 1e-3 * sum(ground_truth.cosine_rates(b.regression_steps))
book_moved = (book_traj.std.log() + 5).abs().max().item()
glue("ch9_gt_needed", (optimum_std.log() + 5).max().item())
reached = [name for name, t in regression.items() if t.final["sigma_error"] < 0.05]
glue_text("ch9_gt_reached", " and ".join(reached) if reached else "none of the learners")
glue("ch9_gt_steps", b.regression_steps)
glue("ch9_gt_book_error", book_traj.final["sigma_error"])
glue("ch9_gt_book_bound", book_bound)
glue("ch9_gt_book_moved", book_moved)
glue("ch9_gt_book_mean_error", book_traj.final["mean_error"])
for name, key in (("sigma-aware", "sigma_aware"), ("IVON", "ivon")):
    glue(f"ch9_gt_{key}_error", regression[name].final["sigma_error"])
    glue(f"ch9_gt_{key}_mean_error", regression[name].final["mean_error"])
# Adam's bound: no log sigma of the book's recipe moved more than the sum of its rates
assert book_moved <= 1.05 * book_bound
if b.check_outcomes:  # what the text below says of this run (10,000 steps, seed 0)
    assert regression["sigma-aware"].final["sigma_error"] < 0.05
    assert regression["IVON"].final["sigma_error"] < 0.05
    assert book_traj.final["sigma_error"] > 0.05
""")

md(r"""
What to see: in the left panel the book's recipe (blue) stays far from the optimum for
most of the run and ends at a worst width error of {glue:text}`ch9_gt_book_error:.0%`
after {glue:text}`ch9_gt_steps:,` steps. Its $\log\sigma$ could move at most
{glue:text}`ch9_gt_book_bound:.2f` (the sum of its learning rates); the widest optimal
width lies {glue:text}`ch9_gt_needed:.2f` above $\log\sigma = -5$, barely inside that
bound, and with noisy sampled gradients Adam's steps fall short of the bound (its largest
move was {glue:text}`ch9_gt_book_moved:.2f`). The sigma-aware recipe ends at
{glue:text}`ch9_gt_sigma_aware_error:.1%` and IVON at {glue:text}`ch9_gt_ivon_error:.1%`;
within 5% of every optimal width: {glue:text}`ch9_gt_reached`. The means (right) end at
worst {glue:text}`ch9_gt_book_mean_error:.2f`, {glue:text}`ch9_gt_sigma_aware_mean_error:.2f`
and {glue:text}`ch9_gt_ivon_mean_error:.2f` optimal widths from the exact posterior mean.

What would indicate a bug: a learner whose width error goes to zero and stays there
exactly (the noise of the sampled gradients should keep it jittering until the learning
rate anneals); IVON's widths converging to the exact *marginals* instead of the
mean-field optimum (a Hessian estimate that includes the off-diagonal terms); a
$\log\sigma$ of the book's recipe that moved further than its bound (the cell asserts
it did not).

So on a problem with a known answer, a learner whose $\sigma$ can move fast enough does
find the ELBO's optimum, and the book's recipe, in this many steps, does not. Part 2 asks
which of the two happened on CIFAR-10.

## Part 2: did $\sigma$ converge on CIFAR-10?

Without a closed form we cannot measure the distance to the optimum, but we can ask the
history of a run two questions (`bnn_course.convergence.convergence_report`):

- **How much of its step budget did each layer use?** Adam moves a parameter by at most
  about one learning rate per step, so the mean $\log\sigma$ of a layer can move at most
  $B = c_\sigma \sum_t \eta_t$ over the run ($c_\sigma$ the `sigma_lr_factor`).
- **Was it still moving at that speed at the end?** The share of the bound it used in the
  last 20% of the epochs (rounded to whole epochs, at least one),
  $|\Delta_{\text{late}}\log\sigma| / B_{\text{late}}$. A layer
  that used half or more of its late bound was still pushed by the ELBO in one direction
  when the run stopped: its $\sigma$ is where the step budget left it. The verdict is then
  **held back by the step size**. For IVON the question is whether $h$ has forgotten $h_0$
  ($\beta_2^T \le 0.05$).
- Otherwise, a layer whose mean $\log\sigma$ still moved by more than 0.05 in that window,
  or a KL term that still changed by more than 2%, is **still moving**; and if neither,
  **converged**.

The next cell loads the networks this chapter compares: chapter 6's BayesianCNN and twin
(reused from chapter 6's run folders when they were trained with exactly this
configuration and these data, else trained here), and trains the two new learners into
`b.run_dir`. Their recipes, and how they were chosen, follow below.
""")

code(r"""
run_dir = Path(b.run_dir)
chapter6_dirs = {"book": Path(budget("training").run_dir),
                 "twin": Path(budget("training").twin_run_dir)}
models, histories, origins = {}, {}, {}
for name, config in configs.items():
    reused = None
    if name in chapter6_dirs:
        ok, reason = reusable_checkpoint(chapter6_dirs[name] / CHECKPOINT_NAME, config, data)
        if ok:
            reused = chapter6_dirs[name] / CHECKPOINT_NAME
    if reused is not None:
        model, state = load_trained_model(reused, device=str(device))
        histories[name] = state["history"]
        origins[name] = f"reused {reused}"
    else:
        folder = run_dir / name
        set_aside_other_data(folder, config, data, other_configuration=True)
        result = train(config, data, out_dir=folder, resume=True,
                       log=lambda line, name=name: print(f"{name}: {line}"))
        model, histories[name] = result.model, result.history
        origins[name] = f"trained in {folder}"
    models[name] = model.eval()
    print(f"{name:12s} {origins[name]}")
num_train = int(training_set(configs["book"], data)[1].shape[0])
training_seconds = {name: sum(r["seconds"] for r in h) for name, h in histories.items()}
""")

md(r"""
### The recipes

Both new learners keep the model of chapter 6 (the same architecture, mean-field Gaussian
weights, Flipout at prediction time) and its budget (epochs, batch size, data). What they
change:

- **Sigma-aware BBB** (`configs["sigma_aware"]`): the $\sigma$ parameters learn at
  `sigma_lr_factor` times the learning rate in their own Adam group, so that the step
  budget is no longer what decides their width; and the prior is scaled by layer,
  $\mathcal{N}(0, 2 s^2 / n_\text{in})$ (`prior_scaling="fan_in"`), the scale of He
  initialisation {cite:p}`he2015delving`, instead of $\mathcal{N}(0, 1)$ for every weight.
  A weight the data do not constrain can then relax to the width of a network drawn from
  the prior, which still passes signals through its layers, rather than towards
  $\sigma = 1$, which chapter 1 showed drowns every signal.
- **IVON** (`configs["ivon"]`): the deterministic twin's weights are IVON's means; the
  same layer-scaled prior enters as IVON's weight decay, $\delta_l = 1/(\lambda s_l^2)$;
  the posterior is the BayesianCNN that `ivon_posterior_network` builds from the means and
  $\sigma = 1/\sqrt{\lambda(h + \delta_l)}$, so it predicts with Flipout samples like the
  others. Like the paper, it clips each element of its step (`ivon_clip_radius`): without
  the clip, the step $(\bar g + \delta m)/(h + \delta)$ explodes wherever $h + \delta$
  becomes small.

One more knob decides everything else: how much the data count against the prior. The
ELBO weighs the NLL of all $N$ examples against one KL term. The KL weight $\beta$ of
chapter 7 (for IVON: the effective sample size $\lambda = N/\beta$) tempers that: with
$\beta < 1$ we maximise the ELBO of the model whose likelihood is raised to the power
$1/\beta$: a *tempered* posterior in the terms of {cite:t}`wenzel2020how` (who call the
version that also tempers the prior a cold posterior). It is still a posterior, converged
or not, but of a tempered model, and the chapter says so wherever it is used.

The settings, $\beta$ and $\lambda$ included, were chosen on the 5,000 held-out training
images, never the test set: `python -m bnn_course.tuning` trained every candidate of
`bnn_course.chapter_runs.POSTERIOR_SWEEP` at the CPU tier's budget and scored its
held-out NLL with the convergence verdict of part 2; within each learner it picks the
lowest held-out NLL among the candidates whose $\sigma$ converged, or among all of them if
none did. That sweep is too long for this page (six more
trainings), so the next cell shows its **recorded** result, with the machine and the
commit that made it; the rest of the chapter trains only the chosen recipes.
""")

code(r"""
sweep_record = json.loads(
    (resources.files("bnn_course") / "recorded" / "sweeps" / "posterior-sweep-cpu.json"
     ).read_text())
record = sweep_record["record"]
print(f"RECORDED sweep, not this page's run: {record['device']}, torch {record['torch']}, "
      f"commit {record['commit']}, {record['date']}")
print(f"command: {record['command']}")
for note in record["notes"]:
    print(f"note: {note}")
sweep = pd.DataFrame(sweep_record["candidates"]).set_index("name")
print(sweep[["validation_nll", "validation_accuracy", "kl_per_example", "verdict",
             "max_share", "hessian_memory", "training_seconds"]].round(4).to_string())
for family, chosen in sweep_record["chosen"].items():
    print(f"chosen for {family}: {chosen['name']} ({chosen['rule']})")
    # the recipes this page trains are the ones the sweep chose (a test checks this too)
    chosen_config = sweep.loc[chosen["name"], "config"]
    for field in ("kl_weight", "sigma_lr_factor", "prior_scaling", "ivon_clip_radius"):
        assert chosen_config[field] == getattr(configs[family], field), field
    if family == "ivon":  # its own learning rate; the effective sample size per image
        sweep_n = (chosen_config["train_subset"] or 50_000) - chosen_config["validation_size"]
        assert chosen_config["ivon_ess"] / sweep_n == configs["ivon"].ivon_ess / num_train
        assert chosen_config["lr"] == configs["ivon"].lr
    else:  # Bayes by Backprop keeps chapter 6's learning rate of each tier
        assert configs[family].lr == configs["book"].lr
glue_text("ch9_sweep_machine", f"{record['hardware']}, commit {record['commit']}")
glue_text("ch9_sweep_sigma_choice", sweep_record["chosen"]["sigma_aware"]["name"])
glue_text("ch9_sweep_ivon_choice", sweep_record["chosen"]["ivon"]["name"])
glue_text("ch9_sweep_rule", "; ".join(
    f"{chosen['name']}: {chosen['rule']}" for chosen in sweep_record["chosen"].values()))
glue("ch9_sweep_beta1_accuracy", sweep.loc["sigma-aware, beta 1", "validation_accuracy"])
glue("ch9_sweep_beta1_kl", sweep.loc["sigma-aware, beta 1", "kl_per_example"])
glue("ch9_sweep_beta1_kl_first",
     sweep.loc["sigma-aware, beta 1", "kl_per_example_by_epoch"][0])
if b.check_outcomes:  # the recorded runs say what the text says
    for name in ("sigma-aware, beta 1", "IVON, ess N"):
        kl = sweep.loc[name, "kl_per_example_by_epoch"]
        assert kl[-1] < kl[0] and kl[-1] < 0.1 * histories["book"][-1]["kl"] / num_train
        assert sweep.loc[name, "validation_accuracy"] < 0.5
glue_text("ch9_sweep_beta1_verdict", sweep.loc["sigma-aware, beta 1", "verdict"])
glue("ch9_sweep_essN_accuracy", sweep.loc["IVON, ess N", "validation_accuracy"])
glue("ch9_sweep_essN_kl", sweep.loc["IVON, ess N", "kl_per_example"])
glue("ch9_book_kl_last", histories["book"][-1]["kl"] / num_train)
""")

md(r"""
Read the rows with $\beta = 1$ and $\lambda = N$ first: they are the ELBO itself, with
$\sigma$ free to go where it wants. Bayes by Backprop then ends at a held-out accuracy of
{glue:text}`ch9_sweep_beta1_accuracy:.1%` with KL/N {glue:text}`ch9_sweep_beta1_kl:.2f`
nats ({glue:text}`ch9_sweep_beta1_verdict`; its KL/N fell from
{glue:text}`ch9_sweep_beta1_kl_first:.2f` after the first epoch), IVON at
{glue:text}`ch9_sweep_essN_accuracy:.1%` with KL/N {glue:text}`ch9_sweep_essN_kl:.2f`;
chapter 6's network ended at KL/N {glue:text}`ch9_book_kl_last:.1f`. A KL near
zero means a posterior near the prior: this network has about 800,000 weights and 45,000
training images, and at $\beta = 1$ it is cheaper, in the ELBO, to leave most weights at
their prior than to pay a few nats each to pin them down. That is where the mean-field
ELBO pulls this model as soon as $\sigma$ may follow it, and such a posterior is of little
use as a classifier. That chapter 6's recipe classifies well is consistent with its
$\sigma$ being kept from getting there; the check below says whether Adam's step budget
is what kept it.

So the recipes that learn are tempered: the sweep chose
**{glue:text}`ch9_sweep_sigma_choice`** and **{glue:text}`ch9_sweep_ivon_choice`**
(recorded on {glue:text}`ch9_sweep_machine`; the rule that decided:
{glue:text}`ch9_sweep_rule`). The next cell prints what they change in
chapter 6's configuration.
""")

code(r"""
for name in ("sigma_aware", "ivon"):
    changed = {f.name: getattr(configs[name], f.name) for f in dataclasses.fields(configs[name])
               if getattr(configs[name], f.name) != getattr(configs["book"], f.name)}
    print(f"{name}: changes to chapter 6's configuration: {changed}")
""")

code(r"""
reports = {name: convergence_report(histories[name], configs[name], num_train)
           for name in ("book", "sigma_aware", "ivon")}
labels = {"book": "the book's recipe", "sigma_aware": "sigma-aware BBB", "ivon": "IVON"}
rows = []
for name, report in reports.items():
    for layer in report.layers:
        rows.append({"learner": labels[name], "layer": layer.name,
                     "log sigma: initial": layer.initial, "final": layer.final,
                     "share of bound": layer.share, "late move": layer.late_moved,
                     "late share": layer.late_share})
print(pd.DataFrame(rows).round(3).to_string(index=False))
for name, report in reports.items():
    print(f"{labels[name]}: {report.verdict} ({report.reason})")
    glue_text(f"ch9_verdict_{name}", report.verdict)
    glue_text(f"ch9_reason_{name}", report.reason)
book_report = reports["book"]
glue("ch9_book_max_share", book_report.max_share)
glue_text("ch9_book_consequence", {
    "held back by the step size": "so chapters 6 and 8 evaluated a posterior whose widths "
                                  "the step budget, not the ELBO, decided",
    "still moving": "so chapters 6 and 8 evaluated a posterior whose widths were still "
                    "changing when training stopped",
    "converged": "so chapters 6 and 8 evaluated a posterior whose widths had settled",
}[book_report.verdict])
glue("ch9_late_epochs", book_report.late_epochs)

fig, axes = plt.subplots(1, 3, figsize=(13, 4))
for ax, (name, report) in zip(axes, reports.items(), strict=True):
    epochs = [0, *report.epochs]
    for layer in report.layers:
        values = [layer.initial] + [
            h["log_sigma"][layer.name] if h.get("log_sigma") else math.log(h["sigma"][layer.name])
            for h in histories[name]]
        ax.plot(epochs, values, "o-", markersize=3, label=layer.name)
    if report.optimizer == "adam":
        steps_per_epoch = math.ceil(num_train / configs[name].batch_size)
        sums = np.cumsum(learning_rates(configs[name], num_train))
        bound = [configs[name].init_log_sigma] + list(
            configs[name].init_log_sigma + configs[name].sigma_lr_factor
            * sums[np.arange(1, len(epochs)) * steps_per_epoch - 1])
        ax.plot(epochs, bound, color="gray", ls="-.", lw=2, label="Adam's bound")
        top = max(max(h["log_sigma"].values()) for h in histories[name])
        ax.set_ylim(top=max(top + 0.5, bound[1] if bound[1] < top + 3 else top + 0.5))
    ax.set(title=f"{labels[name]}: {report.verdict}", xlabel="epoch")
for ax in axes:
    ax.set_ylabel(r"mean $\log\sigma$ of the layer's weights")
axes[0].legend(fontsize=7, ncol=2)
fig.suptitle(f"How far sigma moved, per layer ({data.name}, {configs['book'].epochs} epochs)")
fig.tight_layout()
plt.show()
""")

md(r"""
What to see: in the left panel, chapter 6's recipe. The dash-dotted line is Adam's bound,
the highest any layer's mean $\log\sigma$ could have reached; layers that run along it were
widened as fast as Adam allows for the whole run. The largest share of the bound a layer
used is {glue:text}`ch9_book_max_share:.0%`, and the verdict for this run is
**{glue:text}`ch9_verdict_book`**: {glue:text}`ch9_reason_book`. The middle panel is the
sigma-aware recipe (**{glue:text}`ch9_verdict_sigma_aware`**:
{glue:text}`ch9_reason_sigma_aware`) and the right one IVON
(**{glue:text}`ch9_verdict_ivon`**: {glue:text}`ch9_reason_ivon`); IVON has no step bound,
its $\sigma$ follows its Hessian estimate.

What would indicate a bug: a curve above Adam's bound (the bound or the logged $\sigma$
is wrong); IVON's curves flat at their first value (the Hessian estimate is not updated);
every layer of every learner ending at the same $\log\sigma$ (the $\sigma$ no longer
depends on the data, only on the initialisation or the prior).

## Part 3: does it earn its keep?

### Two post-hoc baselines on the twin

A Bayesian network is worth its cost only if it beats what is cheap. Two cheap fixes of
the twin's over-confidence:

- **Temperature scaling** {cite:p}`guo2017calibration`: divide the twin's logits by one
  number $T$, fitted by minimising the NLL on the held-out training images. Accuracy does
  not change; only the confidence does.
- **Last-layer Laplace** {cite:p}`daxberger2021laplace`: a Gaussian over the twin's output
  layer, centred at its trained weights, with the curvature of the loss (a K-FAC
  generalised Gauss-Newton matrix) plus a prior precision chosen by maximising the
  marginal likelihood, with `laplace-torch`. The layers below stay fixed.
""")

code(r"""
twin = models["twin"]
autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
validation_images, validation_labels = validation_set(configs["twin"], data)
validation_log_probs, _ = predict_log_probs(twin, validation_images.to(device), 0,
                                            autocast_dtype=autocast_dtype)
temperature = fit_temperature(validation_log_probs, validation_labels.to(device))
scaled_twin = TemperatureScaled(twin, temperature)
print(f"temperature fitted on {validation_labels.shape[0]:,} held-out training images: "
      f"T = {temperature:.3f}")

started = time.perf_counter()
train_images, train_labels = training_set(configs["twin"], data)
laplace = fit_last_layer_laplace(twin, train_images, train_labels)
laplace_seconds = time.perf_counter() - started
summary = laplace_summary(laplace)
print(f"last-layer Laplace fitted on {train_labels.shape[0]:,} training images in "
      f"{laplace_seconds:.0f} s: {summary}")
glue("ch9_temperature", temperature)
glue("ch9_laplace_precision", summary["prior_precision"])
glue("ch9_laplace_seconds", laplace_seconds)
""")

md(r"""
The fitted temperature is $T =$ {glue:text}`ch9_temperature:.2f` (above 1: the twin was
over-confident on images it had not trained on; below 1: under-confident), and the
marginal likelihood chose a prior precision of {glue:text}`ch9_laplace_precision:.3g` for
the last layer, in {glue:text}`ch9_laplace_seconds:.0f` s.

### Which variational learner do we recommend?

Chosen like the recipes, on the held-out training images: the variational learner with the
lowest held-out NLL among those whose $\sigma$ converged (or, if none did, the lowest
held-out NLL, and the chapter says so). The test set is not looked at.
""")

code(r"""
validation_scores = {}
for name in ("sigma_aware", "ivon"):
    seed_everything(0)
    validation_scores[name] = evaluate(models[name], validation_images.to(device),
                                       validation_labels.to(device), b.num_samples,
                                       autocast_dtype=autocast_dtype)
    print(f"{labels[name]}: held-out NLL {validation_scores[name]['nll_mc']:.4f}, accuracy "
          f"{validation_scores[name]['accuracy_mc']:.4f} ({b.num_samples} samples); "
          f"{reports[name].verdict}")
converged = [n for n in validation_scores if reports[n].verdict == "converged"]
candidates = converged or list(validation_scores)
recommended = min(candidates, key=lambda n: validation_scores[n]["nll_mc"])
glue_text("ch9_recommended", labels[recommended])
glue_text("ch9_recommended_basis",
          "the lower held-out NLL of the converged learners" if len(converged) > 1 else
          "the only learner whose sigma converged" if converged else
          "the lower held-out NLL, although neither converged")
print(f"recommended: {labels[recommended]}")
""")

md(r"""
The recommendation is **{glue:text}`ch9_recommended`**, by
{glue:text}`ch9_recommended_basis`. These held-out scores need not equal the recorded
sweep's for the same recipe (compare the two printouts): the sweep trained each
candidate with one thread, this page with the threads of its machine, and sums taken in
another order make another training run, as another seed would.

### The table

Every contender predicts the same images: the 10,000 test images, the out-of-distribution
sets of chapter 8, and corrupted copies of a stratified test subset (each corruption made
once and shown to all). Every stochastic contender averages the same number of samples,
`b.num_samples`. For the variational contenders the negative ELBO per training example,
NLL plus KL/N, is estimated on `b.elbo_images` training images, together with the objective
each one actually minimised, NLL plus $\beta$ KL/N (its own $\beta$; for IVON
$N/\lambda$). Objectives compare only with the same prior and the same $\beta$: the book's
recipe has another prior ($\mathcal{N}(0, 1)$) than the other two, and the sigma-aware
recipe and IVON {glue:text}`ch9_same_objective`.
""")

code(r"""
ood_groups: dict[str, torch.Tensor] = {}
ood_sets = load_ood_sets(max_images=b.ood_max_images, allow_download=b.ood_download,
                         generator=torch.Generator().manual_seed(0), groups=ood_groups)
# a set whose images are not independent (crops of a few photographs) is left out
ood_images = {name: images for name, (images, _) in ood_sets.items()
              if ood_groups[name].unique().numel() == images.shape[0]}
left_out = sorted(set(ood_sets) - set(ood_images))
print(f"OOD sets scored: {', '.join(ood_images)}; left out (not independent images): "
      f"{', '.join(left_out) or 'none'}")
glue_text("ch9_ood_sets", ", ".join(ood_images))
glue_text("ch9_ood_left_out", (", ".join(left_out) + " (crops of a few photographs)")
          if left_out else "none")
corruption_images, corruption_labels = (
    (data.test_images, data.test_labels) if b.corruption_test_size is None
    else stratified_subset(data.test_images, data.test_labels, b.corruption_test_size))
contenders = [
    Contender("the book's recipe", "sampled", models["book"], training_seconds["book"],
              reports["book"]),
    Contender("sigma-aware BBB", "sampled", models["sigma_aware"],
              training_seconds["sigma_aware"], reports["sigma_aware"]),
    Contender("IVON", "sampled", models["ivon"], training_seconds["ivon"], reports["ivon"]),
    Contender("twin", "deterministic", twin, training_seconds["twin"]),
    Contender("temperature-scaled twin", "deterministic", scaled_twin,
              training_seconds["twin"]),
    Contender("Laplace twin", "laplace", laplace, training_seconds["twin"] + laplace_seconds),
]
seed_everything(0)
started = time.perf_counter()
scores = scorecard(contenders, data.test_images.to(device), data.test_labels,
                   num_samples=b.num_samples, ood_sets=ood_images,
                   corruption_images=corruption_images.to(device),
                   corruption_labels=corruption_labels, corruptions=b.corruptions,
                   severities=b.severities, autocast_dtype=autocast_dtype)
elbo_images, elbo_labels = stratified_subset(train_images, train_labels, b.elbo_images)
# the KL weight each variational contender's objective has: beta, or N / ess for IVON
betas = {"the book's recipe": configs["book"].kl_weight,
         "sigma-aware BBB": configs["sigma_aware"].kl_weight,
         "IVON": num_train / (configs["ivon"].ivon_ess or num_train)}
for contender in contenders:
    row = next(r for r in scores.rows if r["name"] == contender.name)
    if contender.kind == "sampled":
        elbo = negative_elbo_estimate(contender.model, elbo_images, elbo_labels, num_train)
        row.update(train_nll=elbo["nll"], kl_per_example=elbo["kl_per_example"],
                   negative_elbo=elbo["negative_elbo"], beta=betas[contender.name])
        row["objective"] = row["train_nll"] + row["beta"] * row["kl_per_example"]
        row["step-bound share"] = contender.convergence.max_share
        row["verdict"] = contender.convergence.verdict
print(f"scored in {time.perf_counter() - started:.0f} s")
same_objective = math.isclose(betas["sigma-aware BBB"], betas["IVON"])
glue_text("ch9_same_objective",
          f"optimise the same tempered objective (beta = {betas['IVON']:g})" if same_objective
          else f"optimise different objectives (beta = {betas['sigma-aware BBB']:g} and "
               f"{betas['IVON']:g})")
columns = {"accuracy": "accuracy", "nll": "NLL", "brier": "Brier", "ece": "ECE",
           "ece_floor": "ECE floor", "auroc_entropy": "OOD AUROC (entropy)",
           "auroc_mutual_information": "OOD AUROC (MI)", "corrupted_nll": "corrupted NLL",
           "train_nll": "train NLL", "negative_elbo": "-ELBO/N", "kl_per_example": "KL/N",
           "beta": "beta",
           "objective": "NLL + beta KL/N",
           "step-bound share": "step-bound share", "verdict": "verdict",
           "training_seconds": "training s"}
table = pd.DataFrame(scores.rows).set_index("name").reindex(columns=list(columns))
table.columns = list(columns.values())
table.index.name = None
print(f"{data.name}: {data.test_labels.shape[0]:,} test images; OOD: "
      f"{', '.join(ood_images)} ({b.ood_max_images} images each at most); corruptions: "
      f"{len(b.corruptions)} x severities {b.severities} on {corruption_labels.shape[0]:,} "
      f"images; {b.num_samples} samples per stochastic contender; one seed")
table
""")

code(r"""
by_name = {row["name"]: row for row in scores.rows}
rec = labels[recommended]
num_test = data.test_labels.shape[0]
paired = {}
for other in ("twin", "temperature-scaled twin", "Laplace twin", "the book's recipe"):
    for metric, key, direction in (("accuracy", "correct", +1), ("NLL", "nll", -1),
                                   ("Brier", "brier", -1)):
        difference, se = paired_comparison(scores, rec, other, key)
        paired[(other, metric)] = verdict(difference, se, direction)
ece_floor = max(by_name[rec]["ece_floor"], by_name["twin"]["ece_floor"])
ece_difference, ece_se = paired_ece_difference(scores, rec, "twin", data.test_labels)
paired[("twin", "ECE")] = verdict(ece_difference, ece_se, -1, noise_floor=ece_floor)
verdicts = pd.Series({f"{rec} vs {other}: {metric}": text
                      for (other, metric), text in paired.items()})
print(verdicts.to_string())
for (other, metric), text in paired.items():
    key = other.replace(" ", "_").replace("'", "").replace("-", "_")
    glue_text(f"ch9_vs_{key}_{metric.lower()}", text)
glue("ch9_ece_floor", ece_floor)
""")

md(r"""
How to read the table:

- **Accuracy, NLL, Brier** judge the predictive distribution (NLL and Brier are proper
  scoring rules: they reward calibrated confidence, not only the top class). Against the
  twin, {glue:text}`ch9_recommended` is, in accuracy, {glue:text}`ch9_vs_twin_accuracy`;
  in NLL, {glue:text}`ch9_vs_twin_nll`; in Brier score, {glue:text}`ch9_vs_twin_brier`
  (paired standard errors over the same test images).
- **ECE** has a noise floor: a perfectly calibrated predictor with the same confidences
  would show about {glue:text}`ch9_ece_floor:.3f` on this many images (the "ECE floor"
  column, `bnn_course.metrics.calibrated_ece_expectation`), so differences below it say
  nothing. Against the twin (paired bootstrap over the test images):
  {glue:text}`ch9_vs_twin_ece`.
- **The temperature-scaled twin** is the cheapest competitor: one number fitted after
  training. Against it, in NLL: {glue:text}`ch9_vs_temperature_scaled_twin_nll`.
- **OOD AUROC** is the mean, over the out-of-distribution sets of chapter 8 whose images
  are independent ({glue:text}`ch9_ood_sets`; left out: {glue:text}`ch9_ood_left_out`), of
  the AUROC of the predictive entropy (and of the mutual
  information, which a single network does not have); the **corrupted NLL** is the mean
  NLL over the corrupted copies.
- **-ELBO/N, KL/N and NLL + beta KL/N**: the untempered ELBO, its KL part, and the
  objective each contender minimised; lower is a better optimum only between contenders
  with the same prior and the same $\beta$.

These are statements about one seed of each method on one test set: the paired standard
errors cover the test images, not the training runs.
""")

code(r"""
checks = target_checks(scores.rows, rec, "twin", "temperature-scaled twin",
                       reports[recommended].verdict == "converged")
target_table = pd.DataFrame([{"target": c.target, "measured": c.detail,
                              "holds": "yes" if c.holds else "no"} for c in checks])
print(f"targets for the recommended learner ({rec}), this run ({tier} tier):")
print(target_table.to_string(index=False))
held = [c.target for c in checks if c.holds]
missed = [c.target for c in checks if not c.holds]
glue_text("ch9_targets_held", "; ".join(held) if held else "none")
glue_text("ch9_targets_missed", "; ".join(missed) if missed else "none")
glue("ch9_targets_held_count", len(held))
glue("ch9_targets_count", len(checks))
# the recommended learner's algorithm on the ground truth of part 1
gt_name = {"sigma_aware": "sigma-aware", "ivon": "IVON"}[recommended]
glue("ch9_recommended_gt_error", regression[gt_name].final["sigma_error"])
glue_text("ch9_recommended_gt_reached",
          "reached" if regression[gt_name].final["sigma_error"] < 0.05 else "did not reach")
""")

md(r"""
### The targets

A posterior worth having should beat the twin where a posterior should: accuracy at least
the twin's, an NLL at least 0.03 nats lower and no higher than the temperature-scaled
twin's, an ECE no higher, an OOD AUROC at least 0.02 higher, and a $\sigma$ that
converged. In this run, {glue:text}`ch9_targets_held_count` of the
{glue:text}`ch9_targets_count` targets hold for {glue:text}`ch9_recommended`, judged on
point estimates (the verdicts above give their standard errors; an ECE difference below
the noise floor decides nothing either way). Held:
{glue:text}`ch9_targets_held`. Missed: {glue:text}`ch9_targets_missed`. On the ground
truth of part 1, the same algorithm {glue:text}`ch9_recommended_gt_reached` the
mean-field optimum (worst width error {glue:text}`ch9_recommended_gt_error:.1%`).

The GPU tier runs the same table at chapter 6's GPU budget (30 epochs with augmentation);
the book's pages carry the run of the tier named in the provenance line at the top, and
the GPU tier of this chapter has not been run for them yet.

## Summary

- A variational posterior is only as good as its optimisation. On Bayesian linear
  regression, where the best mean-field posterior is known, the book's recipe ended
  {glue:text}`ch9_gt_book_error:.0%` away from the optimal widths: Adam moves
  $\log\sigma$ by at most one learning rate per step, and less with noisy gradients; the
  sigma-aware recipe and IVON ended {glue:text}`ch9_gt_sigma_aware_error:.1%` and
  {glue:text}`ch9_gt_ivon_error:.1%` away.
- `convergence_report` asks a run's history whether each layer's $\sigma$ was still
  moving at the optimiser's speed limit when the run ended. Chapter 6's network:
  **{glue:text}`ch9_verdict_book`**; {glue:text}`ch9_book_consequence`.
- At $\beta = 1$, with $\sigma$ free to move, both Bayes by Backprop and IVON head for the
  prior and classify poorly (the recorded sweep). The recipes that learn are tempered
  ({glue:text}`ch9_sweep_sigma_choice` and {glue:text}`ch9_sweep_ivon_choice`): posteriors
  of a model whose likelihood counts more than the ELBO's. Their verdicts here: sigma-aware
  BBB **{glue:text}`ch9_verdict_sigma_aware`**; IVON **{glue:text}`ch9_verdict_ivon`**.
- Against the cheap alternatives, the recommended learner ({glue:text}`ch9_recommended`)
  met {glue:text}`ch9_targets_held_count` of {glue:text}`ch9_targets_count` targets in this
  run. Temperature scaling costs one number fitted on held-out images; last-layer Laplace a
  pass over the training set.
- Tuning uses held-out training images, never the test set; comparisons use paired
  standard errors and the ECE's noise floor, and one seed tells us about that seed.

## Exercises

1. **Where the step budget decides.** Train chapter 6's recipe with `sigma_lr_factor=3` and
   then `10` (keep everything else). Run `convergence_report` on each history. At which
   factor does the verdict change, and what happens to the test NLL?

:::{admonition} Solution
:class: dropdown

```python
for factor in (3.0, 10.0):
    config = dataclasses.replace(configs["book"], sigma_lr_factor=factor)
    result = train(config, data, out_dir=run_dir / f"book-sigma{factor:g}", resume=True)
    report = convergence_report(result.history, config, num_train)
    print(factor, report.verdict, report.max_share, result.final["nll_mc"])
```

The bound grows with the factor, so the share of it each layer uses falls; the verdict
turns from "held back by the step size" to "still moving" or "converged" once the bound
exceeds the distance to the widths the ELBO wants. Whether the NLL improves depends on
the prior: under $\mathcal{N}(0, 1)$ the widths the ELBO wants are wide, and a network
that gets them predicts with more noise. Compare your numbers with the table above.
:::

2. **The temperature's data.** Fit the temperature on the *training* images the twin saw
   instead of the held-out ones. Is $T$ larger or smaller, and why is the held-out fit the
   right one?

:::{admonition} Solution
:class: dropdown

```python
seen_log_probs, _ = predict_log_probs(twin, train_images[:5000].to(device), 0)
print(fit_temperature(seen_log_probs, train_labels[:5000].to(device)), temperature)
```

On images it was trained on the twin is more often right and more confident than on new
images, so the NLL there prefers a smaller $T$ (or one below 1: sharpening). The
temperature must correct the confidence on *new* images, which is what the held-out
images stand for; fitting it on the training images repeats the over-confidence it is
meant to remove.
:::

3. **IVON's memory.** IVON's $h$ forgets $h_0$ at the rate $\beta_2$. On the regression of
   part 1, run `ground_truth.fit_ivon(problem, steps=b.regression_steps, beta2=0.99999)`.
   How far from the optimum does it end, and what does `convergence_report`'s IVON rule
   say about such a run?

:::{admonition} Solution
:class: dropdown

```python
slow = ground_truth.fit_ivon(problem, steps=b.regression_steps, beta2=0.99999)
print(slow.final, 0.99999 ** b.regression_steps)
```

With $\beta_2 = 0.99999$ the initial $h_0$ still weighs $\beta_2^T$ (about 0.9 for
10,000 steps), so $\sigma$ stays near its initial $1/\sqrt{N(h_0 + \delta)}$: the widths
are set by $h_0$ and $\beta_2$, IVON's counterpart of Adam's step budget, and the
report's verdict is "held back by the step size". The paper's default suits runs of
hundreds of thousands of steps, not ten thousand.
:::

4. **A second seed.** Every verdict above is about one seed. Train the recommended
   learner again with `seed=1` and compare its test NLL with the first seed's. Is the
   difference between the two seeds smaller than the paired standard errors of the
   verdicts?

:::{admonition} Solution
:class: dropdown

```python
config = dataclasses.replace(configs[recommended], seed=1)
again = train(config, data, out_dir=run_dir / f"{recommended}-seed1", resume=True)
seed1 = evaluate(again.model, data.test_images.to(device), data.test_labels.to(device),
                 b.num_samples)
print(seed1["nll_mc"], by_name[rec]["nll"])
```

The paired standard errors measure how much the comparison would change on other test
images, for these trained networks. The difference between seeds measures how much it
would change for other trainings. When the seed-to-seed difference is of the size of the
differences in the table, one seed cannot rank the methods, however small the paired
standard errors are.
:::
""")

code(r"""
glue("ch9_chapter_minutes", (time.perf_counter() - chapter_started) / 60)
print(f"chapter 9 ran {(time.perf_counter() - chapter_started) / 60:.1f} minutes on "
      f"{device_description(device)} ({tier} tier)")
""")


def notebook() -> dict:
    cells = []
    for index, (kind, text) in enumerate(CELLS):
        cell = {"cell_type": kind, "id": f"ch9-{index:02d}", "metadata": {},
                "source": text.splitlines(keepends=True)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {"cells": cells, "metadata": {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python", "pygments_lexer": "ipython3"}},
        "nbformat": 4, "nbformat_minor": 5}


if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / "book" / "09_is_it_a_posterior.ipynb"
    if len(sys.argv) > 1:
        target = Path(sys.argv[1])
    target.write_text(json.dumps(notebook(), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {target}")

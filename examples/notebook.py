# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # mapsim from Python
#
# The public API in a few cells: load a spec, run it, read the tables as pandas DataFrames,
# draw a heat map, and open the results again later without running anything.
#
# This file is a [Jupytext](https://jupytext.readthedocs.io) percent script: open it as a
# notebook (`jupytext --to notebook examples/notebook.py`), or run it as it is:
#
# ```
# python examples/notebook.py [OUT_DIR]
# ```
#
# It writes into `OUT_DIR` (default: a new temporary folder) and prints what it wrote.

# %%
import sys
import tempfile
from pathlib import Path

import mapsim

# the examples folder (in a notebook, the folder the notebook runs in)
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
# a folder given on the command line (a notebook kernel's own arguments start with "-")
if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
    OUT = Path(sys.argv[1])
else:
    OUT = Path(tempfile.mkdtemp(prefix="mapsim-notebook-"))
OUT.mkdir(parents=True, exist_ok=True)
print(f"mapsim {mapsim.__version__}; writing into {OUT}")

# %% [markdown]
# ## Load a spec
#
# `load_spec` reads a YAML, TOML or JSON file (or takes a dict) and validates it; a mistake
# raises `mapsim.SpecError` naming the field. Relative paths in the file (the images) resolve
# against the file's folder.

# %%
spec = mapsim.load_spec(HERE / "quickstart.yaml")
print(f"spec {spec.name!r}: models {', '.join(spec.models)}; "
      f"comparisons {[list(p) for p in spec.pairs()]}")

# %% [markdown]
# ## Run it
#
# `run` writes the results directory and returns it opened, as a `mapsim.Results`.

# %%
res = mapsim.run(spec, out=OUT / "quickstart", overwrite=True, progress=False)
print(res)

# %% [markdown]
# ## The tables are DataFrames
#
# `pivot`: per image and layer pair, the mean best value (`best_mean`) and the % of maps
# whose best partner passes the threshold (`pct_well`).

# %%
columns = ["image", "model_a", "layer_a", "model_b", "layer_b", "best_mean", "pct_well"]
print(res.pivot[columns].head().to_string())

# %% [markdown]
# `max` has one row per map and partner layer: the map's best partner and its value. The
# share of well-correlated maps of each layer of `cnn4` with itself and with `cnn6`, over all
# images:

# %%
own_layer = res.max[(res.max.model_b != res.max.model_a) | (res.max.layer_a == res.max.layer_b)]
well = (own_layer.groupby(["model_a", "layer_a", "model_b"], sort=False)["well_correlated"]
        .mean().mul(100).round(1).rename("% well correlated"))
print(well.loc["cnn4"].to_string())

# %% [markdown]
# ## Figures
#
# `heatmap` and `histogram` return matplotlib figures: show them in a notebook, or save them.

# %%
fig = res.heatmap("pearson", "pct_well", model_a="cnn4", model_b="cnn6")
heatmap_png = OUT / "pct_well-cnn4-cnn6.png"
fig.savefig(heatmap_png, dpi=100)
print(f"wrote {heatmap_png}")

fig = res.histogram("pearson", model_a="cnn6")
histogram_png = OUT / "hist-cnn6.png"
fig.savefig(histogram_png, dpi=100)
print(f"wrote {histogram_png}")

# %% [markdown]
# ## A spec as a dict
#
# The same fields as a file. Relative paths resolve against `base_dir` (default: the current
# folder). A layer-level metric (linear CKA) lands in `layer_similarity`; one image, no
# pictures.

# %%
small = mapsim.load_spec({
    "name": "cka-one-image",
    "models": {"cnn4": {"architecture": {"name": "fcn", "depth": 4, "width": 16}, "seed": 4}},
    "layers": {"cnn4": "blocks.*"},
    "images": {"name": "files", "paths": "data/vessels-1.png"},
    "metrics": ["pearson", {"name": "cka", "kernel": "linear"}],
}, base_dir=HERE)
cka = mapsim.run(small, out=OUT / "cka", overwrite=True, progress=False, plots=False)
print(cka.layer_similarity[["layer_a", "layer_b", "value"]].head().to_string())
cka_png = OUT / "cka.png"
cka.heatmap("cka").savefig(cka_png, dpi=100)
print(f"wrote {cka_png}")

# %% [markdown]
# ## Open the results later
#
# `open_results` reads a results directory without running anything.

# %%
again = mapsim.open_results(OUT / "quickstart")
assert again.pivot.equals(res.pivot)
print(f"reopened {again.dir}: {again.n_images} image(s), tables {', '.join(again.tables)}")

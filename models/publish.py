"""What the model builds share: finding a wheel, writing model.toml, and publishing a build
into the repository atomically.

Every build (build_repository.py, build_language.py, build_recommender.py) assembles its
models in OUT.tmp (`start_staging`) and renames it to OUT (`publish`) only after every check
has passed, so a failed or killed build never leaves a partial model at OUT. The scripts run as
`python models/<script>.py`, which puts this folder on sys.path.
"""

import json
import shutil
import sys
import tomllib


def find_wheel(wheels_dir, prefix, fail=sys.exit):
    """The one `prefix*.whl` in wheels_dir; `fail(message)` when there is not exactly one."""
    matches = sorted(wheels_dir.glob(prefix + "*.whl"))
    if len(matches) != 1:
        fail(f"expected exactly one {prefix}*.whl in {wheels_dir}, found {len(matches)}")
    return matches[0]


def toml_value(value):
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)  # int, or float repr (always has '.' or 'e', as TOML requires)


def write_model_toml(model_dir, config, keys, arrays=(), tables=(), fail=sys.exit):
    """Write model.toml in the fixed layout the Rust loaders expect: the top-level `keys`, then
    each `[[array]]` entry, then each `[table]`, in the order given. The text is re-parsed and
    must equal `config`, so nothing is left out or written wrongly; else `fail(message)`."""
    lines = [f"{key} = {toml_value(config[key])}" for key in keys]
    for array in arrays:
        for entry in config[array]:
            lines += ["", f"[[{array}]]"] + [f"{k} = {toml_value(v)}" for k, v in entry.items()]
    for table in tables:
        lines += ["", f"[{table}]"] + [f"{k} = {toml_value(v)}" for k, v in config[table].items()]
    text = "\n".join(lines) + "\n"
    if tomllib.loads(text) != config:
        fail(f"model.toml for {config['name']} does not round-trip")
    (model_dir / "model.toml").write_text(text)


def start_staging(out):
    """A fresh, empty OUT.tmp beside `out` (an absolute path), where a build assembles its
    models; whatever a killed or failed build left there is removed first."""
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish(staging, out):
    """Swap the finished staging dir into place. A crash between the two renames leaves
    OUT absent (plus OUT.old), never a mix of old and new models."""
    previous = out.with_name(out.name + ".old")
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():
        out.rename(previous)
    staging.rename(out)
    shutil.rmtree(previous, ignore_errors=True)

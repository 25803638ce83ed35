//! Small TorchScript models built by a test itself with the venv's Python (`torch.jit.script`):
//! never downloaded, never committed as binaries. Each lands in a model repository directory
//! with its `model.toml`, ready for a real service to load.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python that has torch: `MARQUEE_PYTHON`, else the venv's (`VIRTUAL_ENV`, set by the
/// cargo config), else `python3` on the path.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MARQUEE_PYTHON") {
        return p.into();
    }
    match std::env::var_os("VIRTUAL_ENV") {
        Some(venv) => Path::new(&venv).join("bin/python"),
        None => "python3".into(),
    }
}

/// Writes `repo/<name>/model.toml` (`model_toml`, verbatim) and `repo/<name>/1/model.pt`: a
/// scripted module whose `forward(self, x: Tensor)` has the Python body `forward` (lines
/// without indentation; they are indented here).
pub fn build_model(repo: &Path, name: &str, forward: &str, model_toml: &str) {
    let dir = repo.join(name);
    std::fs::create_dir_all(dir.join("1")).unwrap();
    std::fs::write(dir.join("model.toml"), model_toml).unwrap();
    let body: String = forward.lines().map(|l| format!("        {l}\n")).collect();
    let script = format!(
        "import sys, torch\n\
         torch.set_num_threads(1)\n\
         class M(torch.nn.Module):\n    \
         def forward(self, x: torch.Tensor):\n{body}\
         torch.jit.save(torch.jit.script(M()), sys.argv[1])\n"
    );
    // TorchScript compiles from source it reads back from the file, so no `python -c`.
    let file = tempfile::Builder::new().suffix(".py").tempfile().unwrap();
    std::fs::write(file.path(), &script).unwrap();
    let out = Command::new(python())
        .arg(file.path())
        .arg(dir.join("1/model.pt"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(
        out.status.success(),
        "building `{name}` failed:\n{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

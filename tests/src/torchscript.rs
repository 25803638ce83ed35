//! Small TorchScript models built by a test itself with the venv's Python (`torch.jit.script`):
//! never downloaded, never committed as binaries. Each lands in a model repository directory
//! with its `model.toml`, ready for a real service to load.

use std::path::Path;

pub use crate::lifecycle::{python, run_python};

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
    run_python(&script, &[&dir.join("1/model.pt")]);
}

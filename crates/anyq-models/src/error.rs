//! Errors of model loading: each names the file and, where there is one, the tensor or key.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    // Not a `source`: the message already includes the I/O error, and error chains would print it twice.
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },
    #[error("metadata: {0}")]
    Metadata(String),
    #[error("{}: tensor {tensor}: {message}", path.display())]
    Tensor { path: PathBuf, tensor: String, message: String },
    #[error("unsupported architecture {0:?} (supported: llama, mistral, qwen2)")]
    UnsupportedArchitecture(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl LoadError {
    /// Wraps an I/O error with the file it concerns: `.map_err(LoadError::io(&path))`.
    pub fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
        move |error| LoadError::Io { path: path.to_path_buf(), error }
    }
}

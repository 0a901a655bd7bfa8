//! Errors of model loading: each names the file and, where there is one, the tensor or key.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("metadata: {0}")]
    Metadata(String),
    #[error("{path}: tensor {tensor}: {message}")]
    Tensor { path: PathBuf, tensor: String, message: String },
    #[error("unsupported architecture {0:?} (supported: llama, mistral, qwen2)")]
    UnsupportedArchitecture(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

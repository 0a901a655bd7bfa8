//! Model architectures and their loaders: GGUF files and Hugging Face folders become a
//! `LlamaModel` whose linear layers are `anyq_core::Linear`s.

pub mod checkpoint;
pub mod config;
pub mod cuda;
pub mod cuda_bench;
pub mod cuda_mixq;
pub mod decoder;
pub mod error;
pub mod llama;
pub mod loader;
pub mod tokenizer;

pub use checkpoint::{save_quantized, QuantizationConfig, SaveError};
pub use config::{Architecture, ModelConfig};
pub use decoder::{CpuDecoder, Decoder};
pub use error::LoadError;
pub use llama::{ActivationObserver, FloatWeight, ForwardError, KvCache, LinearInput, LlamaModel, LINEAR_MODULES};
pub use loader::{load_model, LoadedModel, TokenizerBundle};

//! The engine: generation (sampling, streaming), perplexity evaluation, calibration and chat templates,
//! on top of the model layer.

pub mod calibrate;
pub mod chat;
pub mod generate;
pub mod perplexity;
pub mod quantize;
pub mod sampling;

pub use calibrate::{calibrate, calibrate_with, CalibrationStats};
pub use generate::{generate, generate_with, Generation, GenerationStats, StopReason, TextStream};
pub use perplexity::{perplexity, perplexity_with, PerplexityError, PerplexityReport};
pub use quantize::{outlier_report, quantize_model};
pub use sampling::{argmax, Sampler, SamplingParams};

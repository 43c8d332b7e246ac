//! ALBEF ("Align before Fuse") in libtorch through tch.
//!
//! Modules mirror the reference checkpoint: [`vit::VisionTransformer`] (timm names),
//! [`bert::BertForMaskedLm`] (Hugging Face names) and [`albef::Albef`], whose variables carry
//! the reference ALBEF state-dict names so that weights move both ways by name ([`weights`]).

pub mod albef;
pub mod bert;
pub mod device;
pub mod flops;
pub mod nn;
pub mod vit;
pub mod weights;

pub use albef::{Albef, Batch, FeatureGather, Gathered, LocalGather, Losses};
pub use albef_config::ModelConfig;

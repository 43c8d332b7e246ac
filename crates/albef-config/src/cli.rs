//! The configuration flags every albef binary takes.

use crate::{AlbefConfig, ConfigSources};
use std::path::PathBuf;

#[derive(clap::Args, Clone, Debug, Default)]
pub struct ConfigArgs {
    /// YAML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a key: --set optimizer.lr=3e-4 (repeatable; beats the file and ALBEF__* variables).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

impl ConfigArgs {
    /// Defaults < file < environment < --set.
    pub fn load(&self) -> anyhow::Result<AlbefConfig> {
        crate::load(&ConfigSources { file: self.config.clone(), overrides: self.overrides.clone(), environment: true })
    }
}

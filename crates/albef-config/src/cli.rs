//! The configuration flags every albef binary takes.

use crate::{AlbefConfig, ConfigSources};
use std::path::PathBuf;

#[derive(clap::Args, Clone, Debug, Default)]
pub struct ConfigArgs {
    /// YAML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a key: --set optimizer.lr=3e-4 (repeatable; beats the file and ALBEF__* variables;
    /// values typed as YAML, lists as --set 'data.train_file=[a.json, b/{0..3}.tar, "c,d.json"]').
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Print the effective configuration at start (it is always written to the run directory's
    /// config.yaml).
    #[arg(long)]
    pub print_config: bool,
}

impl ConfigArgs {
    /// Defaults < file < environment < --set.
    pub fn load(&self) -> anyhow::Result<AlbefConfig> {
        crate::load(&ConfigSources { file: self.config.clone(), overrides: self.overrides.clone(), environment: true })
    }

    /// Tells where the effective configuration went (`written_to`), and prints it with
    /// `--print-config`.
    pub fn announce(&self, cfg: &AlbefConfig, written_to: &str) {
        if self.print_config {
            eprintln!("effective configuration:\n{}", cfg.to_pretty_json());
        }
        eprintln!("configuration: {written_to} (--print-config prints it)");
    }
}

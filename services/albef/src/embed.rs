//! `albef embed`: normalised ITC embeddings of images or captions, as safetensors with the keys
//! they belong to.

use crate::eval::{ModelArgs, load_model, load_tokenizer, runtime};
use albef_data::store::{Location, expand_pattern};
use albef_eval::embed::{embed_images, embed_texts, serialize_embeddings};
use anyhow::{Context, Result, ensure};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Images to embed: paths or object-store URLs, brace patterns allowed
    /// (`data/images/test/synth-{00000000..00000009}.jpg`).
    #[arg(long, num_args = 1.., required_unless_present = "texts", conflicts_with = "texts")]
    pub images: Vec<String>,
    /// A text file with one caption per line (empty lines are skipped).
    #[arg(long)]
    pub texts: Option<String>,
    /// The safetensors file to write: tensor `embeddings` (n, embed_dim) and, in the metadata,
    /// `keys` (JSON list of the image URLs or captions, in row order) and `kind`.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: EmbedArgs) -> Result<()> {
    let rt = runtime()?;
    let handle = rt.handle();
    let model = load_model(&args.model, handle)?;
    let cfg = &model.cfg;
    let bf16 = cfg.train.bf16;
    let (kind, keys, embeddings) = match &args.texts {
        Some(file) => {
            let bytes = handle.block_on(Location::open(file)?.read_all())?;
            let text = String::from_utf8(bytes.to_vec()).with_context(|| format!("{file} is not UTF-8 text"))?;
            let captions: Vec<String> =
                text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
            ensure!(!captions.is_empty(), "{file} holds no caption");
            let tokenizer = load_tokenizer(args.model.tokenizer.as_deref(), &model, None, handle)?;
            let e = embed_texts(&model.model, &tokenizer, &captions, cfg.data.max_words, args.model.batch_size, bf16)?;
            ("text", captions, e)
        }
        None => {
            let mut urls = vec![];
            for pattern in &args.images {
                urls.extend(expand_pattern(pattern)?);
            }
            let bytes = handle.block_on(async {
                let mut out = vec![];
                for u in &urls {
                    out.push(Location::open(u)?.read_all().await?);
                }
                anyhow::Ok(out)
            })?;
            let e = embed_images(&model.model, &bytes, &urls, args.model.batch_size, bf16, cfg.data.max_pixels)?;
            ("image", urls, e)
        }
    };
    let extra = [("model", model.source.clone()), ("step", model.step.map_or(String::new(), |s| s.to_string()))];
    let file = serialize_embeddings(&embeddings, kind, &keys, &extra)?;
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, file).with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "{} {kind} embeddings of dimension {} written to {}",
        keys.len(),
        embeddings.size()[1],
        args.out.display()
    );
    Ok(())
}

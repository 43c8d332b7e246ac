//! `albef embed`: features of images, captions or (image, caption) pairs, as safetensors or
//! `.npz`, with the image URLs and captions they belong to.

use crate::eval::{ModelArgs, load_model, load_tokenizer, runtime};
use albef_data::store::{Location, expand_patterns};
use albef_eval::embed::{EMBEDDINGS, Features, Format, Images, Inputs, Tokens, embed_images, embed_texts, extract};
use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use tokio::runtime::Handle;

/// What `--mode` extracts, as LAVIS's `extract_features` modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// `image_embeds` (n, 1+patches, width): the ViT's tokens, unnormalised; `image_feat`
    /// (n, embed_dim): the normalised projection of their [CLS] (LAVIS's
    /// `image_embeds_proj[:, 0]`).
    Image,
    /// `text_embeds` (n, L, width): the text encoder's tokens, unnormalised, captions padded to
    /// the longest; `text_feat` (n, embed_dim): the normalised projection of their [CLS];
    /// `text_mask` (n, L, int64): 1 on tokens, 0 on padding.
    Text,
    /// `multimodal_embeds` (n, L, width): the fusion layers' tokens of each (image, caption) pair
    /// (row i of --images with line i of --texts), unnormalised; `[:, 0]` is the [CLS] the ITM
    /// and SNLI-VE heads read; no projection. `text_mask` as in `text`.
    Multimodal,
}

#[derive(Args, Debug)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// What to extract. Without it: the normalised ITC embeddings (`embeddings`, (n, embed_dim))
    /// of --images or of --texts.
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Images to embed: paths or object-store URLs, brace patterns and globs allowed
    /// (`data/images/test/synth-{00000000..00000009}.jpg`, `photos/*.jpg`).
    #[arg(long, num_args = 1.., required_unless_present = "texts")]
    pub images: Vec<String>,
    /// A text file with one caption per line (empty lines are skipped).
    #[arg(long)]
    pub texts: Option<String>,
    /// The file to write: `.npz`, NumPy's archive (`np.load`: the arrays, `keys` as strings (n,)
    /// or (n, 2), `kind`, `model` and `step` as 0-d strings); any other name, safetensors (the
    /// arrays; `kind`, `keys` (JSON: the image URLs or captions in row order, or [image, caption]
    /// pairs), `model` and `step` in the metadata).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: EmbedArgs) -> Result<()> {
    let format = Format::of(&args.out)?;
    check_inputs(&args)?;
    let rt = runtime()?;
    let handle = rt.handle();
    let model = load_model(&args.model, handle)?;
    let cfg = &model.cfg;
    let (urls, bytes) = read_images(&args.images, handle)?;
    let captions = args.texts.as_deref().map(|f| read_captions(f, handle)).transpose()?.unwrap_or_default();
    let tokens = || -> Result<Tokens> {
        let tokenizer = load_tokenizer(args.model.tokenizer.as_deref(), &model, None, handle)?;
        Ok(Tokens::new(&tokenizer, &captions, cfg.data.max_words))
    };
    let images = Images { bytes: &bytes, names: &urls, max_pixels: cfg.data.max_pixels };
    let (m, bs, bf16) = (model.albef()?, args.model.batch_size, cfg.train.bf16);
    let (kind, arrays) = match args.mode {
        None if args.texts.is_some() => ("text", vec![(EMBEDDINGS, embed_texts(m, &tokens()?, bs, bf16)?)]),
        None => ("image", vec![(EMBEDDINGS, embed_images(m, &images, bs, bf16)?)]),
        Some(Mode::Image) => ("image", extract(m, &Inputs::Image(images), bs, bf16)?),
        Some(Mode::Text) => ("text", extract(m, &Inputs::Text(tokens()?), bs, bf16)?),
        Some(Mode::Multimodal) => ("multimodal", extract(m, &Inputs::Multimodal(images, tokens()?), bs, bf16)?),
    };
    let n = urls.len().max(captions.len());
    let keys: Vec<Vec<String>> = [urls, captions].into_iter().filter(|k| !k.is_empty()).collect();
    let step = model.step.map_or(String::new(), |s| s.to_string());
    let meta = vec![("model", model.source.clone()), ("step", step)];
    let features = Features { kind: kind.into(), keys, arrays, meta };
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    features.write(&args.out, format)?;
    let shapes: Vec<String> = features.arrays.iter().map(|(name, t)| format!("{name} {:?}", t.size())).collect();
    println!("{n} {kind} embeddings written to {}: {}", args.out.display(), shapes.join(", "));
    Ok(())
}

/// Whether the inputs given are those the mode reads.
fn check_inputs(args: &EmbedArgs) -> Result<()> {
    let given = (!args.images.is_empty(), args.texts.is_some());
    let (want, error) = match args.mode {
        None => {
            ensure!(given != (true, true), "--images with --texts are pairs: add --mode multimodal");
            return Ok(());
        }
        Some(Mode::Image) => ((true, false), "--mode image reads --images only"),
        Some(Mode::Text) => ((false, true), "--mode text reads --texts only"),
        Some(Mode::Multimodal) => ((true, true), "--mode multimodal reads --images and --texts"),
    };
    ensure!(want == given, "{error}");
    Ok(())
}

/// The image URLs the patterns name, and their bytes.
fn read_images(patterns: &[String], handle: &Handle) -> Result<(Vec<String>, Vec<Bytes>)> {
    handle.block_on(async {
        let urls = expand_patterns(patterns).await?;
        let mut bytes = vec![];
        for u in &urls {
            bytes.push(Location::open(u)?.read_all().await?);
        }
        Ok((urls, bytes))
    })
}

/// The non-empty lines of a captions file.
fn read_captions(file: &str, handle: &Handle) -> Result<Vec<String>> {
    let bytes = handle.block_on(Location::open(file)?.read_all())?;
    let text = String::from_utf8(bytes.to_vec()).with_context(|| format!("{file} is not UTF-8 text"))?;
    let captions: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    ensure!(!captions.is_empty(), "{file} holds no caption");
    Ok(captions)
}

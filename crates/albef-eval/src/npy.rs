//! NumPy's `.npy` format (version 1.0) and `.npz` archives (an uncompressed zip of `.npy`
//! members), written without Python: what `np.load` reads, without `allow_pickle`.

use anyhow::{Result, bail};
use std::io::{Seek, Write};
use tch::{Kind, Tensor};

/// One array: its dtype as NumPy spells it, shape and little-endian data.
pub struct NpyArray {
    descr: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl NpyArray {
    /// A float32 (`<f4`) or int64 (`<i8`) tensor, copied to host memory.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let descr = match t.kind() {
            Kind::Float => "<f4",
            Kind::Int64 => "<i8",
            k => bail!("no .npy dtype for {k:?}"),
        };
        let shape = t.size().iter().map(|&d| d as usize).collect();
        Ok(Self { descr: descr.into(), shape, data: albef_model::weights::tensor_bytes(t) })
    }

    /// Strings as a fixed-width unicode array (`<U<longest>`, UTF-32 little-endian, zero-padded)
    /// of `shape` (row-major; `[]` for one string).
    pub fn strings(strings: &[String], shape: Vec<usize>) -> Self {
        let width = strings.iter().map(|s| s.chars().count()).max().unwrap_or(0).max(1);
        let mut data = Vec::with_capacity(strings.len() * width * 4);
        for s in strings {
            let chars = s.chars().map(u32::from).chain(std::iter::repeat(0)).take(width);
            data.extend(chars.flat_map(u32::to_le_bytes));
        }
        Self { descr: format!("<U{width}"), shape, data }
    }

    /// The `.npy` file: magic, version 1.0, the header dict padded with spaces to a multiple of 64
    /// bytes and ended by a newline, then the data.
    pub fn to_bytes(&self) -> Vec<u8> {
        let dims: String = self.shape.iter().map(|d| format!("{d}, ")).collect();
        let shape = if self.shape.len() == 1 { dims.trim_end_matches(' ') } else { dims.trim_end_matches(", ") };
        let mut header = format!("{{'descr': '{}', 'fortran_order': False, 'shape': ({shape}), }}", self.descr);
        // magic (6) + version (2) + header length (2) + header, ended by '\n'.
        let total = (10 + header.len() + 1).div_ceil(64) * 64;
        header.extend(std::iter::repeat_n(' ', total - 10 - header.len() - 1));
        header.push('\n');
        let mut out = Vec::with_capacity(total + self.data.len());
        out.extend_from_slice(b"\x93NUMPY\x01\x00");
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&self.data);
        out
    }
}

/// An `.npz` archive of named arrays (member `<name>.npy` each), stored uncompressed.
pub fn write_npz<W: Write + Seek>(out: W, arrays: &[(String, NpyArray)]) -> Result<W> {
    let mut zip = zip::ZipWriter::new(out);
    for (name, array) in arrays {
        let bytes = array.to_bytes();
        let options = zip::write::FileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(bytes.len() as u64 >= u32::MAX as u64);
        zip.start_file(format!("{name}.npy"), options)?;
        zip.write_all(&bytes)?;
    }
    Ok(zip.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (header, data) of a `.npy` file, checking the header's length.
    fn split(b: &[u8]) -> (&str, &[u8]) {
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let len = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + len) % 64, 0);
        let header = std::str::from_utf8(&b[10..10 + len]).unwrap();
        assert!(header.ends_with('\n'), "{header:?}");
        (header, &b[10 + len..])
    }

    #[test]
    fn headers_are_padded_to_64_bytes_with_numpy_shapes() {
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).view([2, 3]);
        let bytes = NpyArray::from_tensor(&t).unwrap().to_bytes();
        let (header, data) = split(&bytes);
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"), "{header}");
        assert_eq!(data.len(), 24);
        let bytes = NpyArray::strings(&["ab".into(), "c".into()], vec![2]).to_bytes();
        let (header, data) = split(&bytes);
        assert!(header.starts_with("{'descr': '<U2', 'fortran_order': False, 'shape': (2,), }"), "{header}");
        assert_eq!(data, [97, 0, 0, 0, 98, 0, 0, 0, 99, 0, 0, 0, 0, 0, 0, 0]);
        let bytes = NpyArray::strings(&["x".into()], vec![]).to_bytes();
        assert!(split(&bytes).0.contains("'shape': ()"));
    }
}

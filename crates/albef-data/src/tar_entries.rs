//! The entries of a tar stream (ustar, GNU and PAX, as GNU tar, Python's tarfile and
//! img2dataset write them), with every header extension held to a bound: a GNU long name or link
//! ('L', 'K') and a PAX record block ('x') are read up to [`MAX_NAME_BYTES`] / [`MAX_PAX_BYTES`]
//! and the rest passed over, a PAX global header ('g') is passed over unread. The `tar` crate
//! reads each extension whole (a 256 MB long name cost GBs), hence this reader.
//!
//! One 512-byte header block is parsed by `tar::Header`; what follows is this module's: the
//! extensions, entry data read or skipped through the stream, and the entry's first header
//! position (extensions included, so that a read starting there sees the entry's full name).

use std::io::{self, Read};
use tar::{EntryType, Header};

/// The longest GNU long name or link kept: Linux's PATH_MAX.
pub const MAX_NAME_BYTES: u64 = 4096;
/// The longest PAX record block parsed: room for a long path and a file's extended attributes.
pub const MAX_PAX_BYTES: u64 = 64 << 10;

const BLOCK: u64 = 512;

/// One entry as its headers describe it; its data is next in the stream.
#[derive(Debug)]
pub struct Entry {
    /// Offset of its first header (an extension's, if any) from the start of the stream.
    pub header_pos: u64,
    /// The name: a GNU long name, else a PAX `path`, else the header's (ustar prefix joined).
    /// Where an extension was over its bound, the part of it that was kept.
    pub path: Vec<u8>,
    /// Data bytes (a PAX `size` overrides the header's).
    pub size: u64,
    /// A regular file (other entries are folders, links, devices: no sample's members).
    pub is_file: bool,
    /// An extension header over its bound, described; the entry's name is then not its own.
    pub oversized_header: Option<String>,
}

/// Extensions seen before the entry they describe.
#[derive(Default)]
struct Pending {
    header_pos: Option<u64>,
    long_name: Option<Vec<u8>>,
    pax_path: Option<Vec<u8>>,
    pax_size: Option<u64>,
    oversized: Option<String>,
}

/// A tar stream read entry by entry.
pub struct TarEntries<R> {
    reader: R,
    /// Bytes consumed from the stream.
    pos: u64,
    /// Data bytes of the current entry not yet read, and its padding to the next block.
    data_left: u64,
    padding: u64,
}

impl<R: Read> TarEntries<R> {
    pub fn new(reader: R) -> Self {
        TarEntries { reader, pos: 0, data_left: 0, padding: 0 }
    }

    /// The next entry, after passing over what is left of the current one; None at the end of
    /// the archive (a zero block, or the end of the stream between entries).
    pub fn next_entry(&mut self) -> io::Result<Option<Entry>> {
        self.skip(self.data_left + self.padding)?;
        (self.data_left, self.padding) = (0, 0);
        let mut pending = Pending::default();
        loop {
            let at = self.pos;
            let Some(header) = self.read_header()? else {
                if pending.header_pos.is_some() {
                    return Err(invalid("the stream ends after an extension header, before its entry"));
                }
                return Ok(None);
            };
            let size = header.entry_size()?;
            let kind = header.entry_type();
            if let Some(kind) = Extension::of(kind) {
                pending.header_pos.get_or_insert(at);
                self.read_extension(kind, size, &mut pending)?;
                continue;
            }
            if kind == EntryType::GNUSparse {
                self.skip_sparse_maps(&header)?;
            }
            let size = pending.pax_size.unwrap_or(size);
            let path = pending.long_name.or(pending.pax_path).unwrap_or_else(|| header.path_bytes().into_owned());
            self.data_left = size;
            self.padding = size.next_multiple_of(BLOCK) - size;
            return Ok(Some(Entry {
                header_pos: pending.header_pos.unwrap_or(at),
                path,
                size,
                is_file: matches!(kind, EntryType::Regular | EntryType::Continuous),
                oversized_header: pending.oversized,
            }));
        }
    }

    /// Reads the current entry's data (at most `max` more bytes) onto `out`; the count read,
    /// short where the stream ends inside it. Never reserves from the declared size.
    pub fn read_data(&mut self, out: &mut Vec<u8>, max: u64) -> io::Result<u64> {
        let n = (&mut self.reader).take(self.data_left.min(max)).read_to_end(out)? as u64;
        self.data_left -= n;
        self.pos += n;
        Ok(n)
    }

    /// A header block; None at the end of the archive.
    fn read_header(&mut self) -> io::Result<Option<Header>> {
        let mut header = Header::new_old();
        let block = header.as_mut_bytes();
        let got = read_full(&mut self.reader, block)?;
        self.pos += got as u64;
        if got == 0 || block.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        if got < block.len() {
            return Err(invalid("the stream ends inside a header"));
        }
        // Unsigned as POSIX says, or signed as some old tars wrote it (Python accepts both).
        let unsigned: u32 =
            block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { b as u32 }).sum();
        let signed: i32 =
            block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { b as i8 as i32 }).sum();
        let want = header.cksum()?;
        if want != unsigned && want as i32 != signed {
            return Err(invalid("archive header checksum mismatch"));
        }
        Ok(Some(header))
    }

    fn read_extension(&mut self, kind: Extension, size: u64, pending: &mut Pending) -> io::Result<()> {
        let bound = match kind {
            Extension::LongName | Extension::LongLink => MAX_NAME_BYTES,
            Extension::Pax => MAX_PAX_BYTES,
            Extension::PaxGlobal => 0,
        };
        let mut data = vec![];
        let got = (&mut self.reader).take(size.min(bound)).read_to_end(&mut data)? as u64;
        self.pos += got;
        self.skip(size - got + (size.next_multiple_of(BLOCK) - size))?;
        let over = size > bound && kind != Extension::PaxGlobal;
        if over {
            pending.oversized = Some(format!("{} of {size} bytes (at most {bound} are read)", kind.name()));
        }
        match kind {
            Extension::LongName => {
                // The kept part names the entry (its sample is skipped): NULs end a name.
                let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
                data.truncate(end);
                pending.long_name = Some(data);
            }
            Extension::Pax if !over => {
                for record in tar::PaxExtensions::new(&data) {
                    let record = record?;
                    match record.key_bytes() {
                        b"path" => pending.pax_path = Some(record.value_bytes().to_vec()),
                        b"size" => {
                            let size = record.value().ok().and_then(|v| v.parse().ok());
                            pending.pax_size = Some(size.ok_or_else(|| invalid("a PAX size that is no number"))?);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// An old GNU sparse entry's further map blocks, which follow its header when flagged.
    fn skip_sparse_maps(&mut self, header: &Header) -> io::Result<()> {
        let mut extended = header.as_bytes()[482] != 0;
        while extended {
            let mut block = [0u8; BLOCK as usize];
            if read_full(&mut self.reader, &mut block)? < block.len() {
                return Err(invalid("the stream ends inside a sparse map"));
            }
            self.pos += BLOCK;
            extended = block[504] != 0;
        }
        Ok(())
    }

    /// Passes over `n` bytes; the stream ending first is an error.
    fn skip(&mut self, n: u64) -> io::Result<()> {
        let got = io::copy(&mut (&mut self.reader).take(n), &mut io::sink())?;
        self.pos += got;
        if got < n {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the stream ends {} bytes short", n - got),
            ));
        }
        Ok(())
    }
}

/// The header extensions this reader knows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Extension {
    LongName,
    LongLink,
    Pax,
    PaxGlobal,
}

impl Extension {
    fn of(kind: EntryType) -> Option<Extension> {
        match kind {
            EntryType::GNULongName => Some(Extension::LongName),
            EntryType::GNULongLink => Some(Extension::LongLink),
            EntryType::XHeader => Some(Extension::Pax),
            EntryType::XGlobalHeader => Some(Extension::PaxGlobal),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Extension::LongName => "a GNU long name",
            Extension::LongLink => "a GNU long link name",
            Extension::Pax => "a PAX header",
            Extension::PaxGlobal => "a PAX global header",
        }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Fills `buf` unless the stream ends first; the count read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

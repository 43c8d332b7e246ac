//! ALBEF's `pre_caption`: the caption cleaning applied before tokenisation.

/// Bytes of a caption read per word it may keep (and so characters, each at least a byte): what
/// a caption costs stays bounded whatever the input (a 10 MB caption without spaces is one
/// "word"); BERT's WordPiece reads a word of more than 100 characters as one [UNK] anyway.
const BYTES_PER_WORD: usize = 200;

/// Lowercases; deletes , . ' ! ? " ( ) * # : ; ~; turns '-' and '/' into spaces and '<person>'
/// into 'person'; collapses whitespace; strips; keeps at most `max_words` words, of the first
/// `max_words` x 200 bytes (cut at a character boundary, so at most as many characters).
pub fn pre_caption(caption: &str, max_words: usize) -> String {
    let mut cut = caption.len().min(max_words.saturating_mul(BYTES_PER_WORD));
    while !caption.is_char_boundary(cut) {
        cut -= 1;
    }
    let read = &caption[..cut];
    let lowered = read.to_lowercase().replace("<person>", "person");
    let cleaned: String = lowered
        .chars()
        .filter(|c| !matches!(c, ',' | '.' | '\'' | '!' | '?' | '"' | '(' | ')' | '*' | '#' | ':' | ';' | '~'))
        .map(|c| if c == '-' || c == '/' { ' ' } else { c })
        .collect();
    cleaned.split_whitespace().take(max_words).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_like_the_reference() {
        assert_eq!(pre_caption("A <person> rides a bike, (quickly)!", 30), "a person rides a bike quickly");
        assert_eq!(pre_caption("red-and-white / striped  ~ \"shirt\"?", 30), "red and white striped shirt");
        assert_eq!(pre_caption("It's: #1; *the* best.", 30), "its 1 the best");
        assert_eq!(pre_caption("   \t\n ", 30), "");
    }

    #[test]
    fn truncates_to_max_words() {
        assert_eq!(pre_caption("one two three four", 2), "one two");
    }

    /// 10 MB captions without a space (ASCII, CJK, 4-byte emoji) are cut in bytes, at a
    /// character boundary, not only in words.
    #[test]
    fn a_caption_without_spaces_is_cut_in_bytes() {
        for unit in ["a", "猫", "🐈"] {
            let caption = unit.repeat((10 << 20) / unit.len());
            let cleaned = pre_caption(&caption, 30);
            assert_eq!(cleaned.len(), 30 * BYTES_PER_WORD / unit.len() * unit.len(), "{unit}");
            assert!(cleaned.chars().all(|c| c.to_string() == unit), "{unit}: whole characters");
        }
        let long_words = format!("{} end", "w".repeat(150)).repeat(40);
        assert_eq!(pre_caption(&long_words, 30).split(' ').count(), 30, "words of 150 characters still count to 30");
    }
}

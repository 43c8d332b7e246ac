//! ALBEF's `pre_caption`: the caption cleaning applied before tokenisation.

/// Lowercases; deletes , . ' ! ? " ( ) * # : ; ~; turns '-' and '/' into spaces and '<person>'
/// into 'person'; collapses whitespace; strips; keeps at most `max_words` words.
pub fn pre_caption(caption: &str, max_words: usize) -> String {
    let lowered = caption.to_lowercase().replace("<person>", "person");
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
}

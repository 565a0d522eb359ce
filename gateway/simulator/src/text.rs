//! Generated reply text for the simulator: pieces of exactly one token each.

/// Words that are one o200k token each, cycled to make replies of an exact token count.
const WORDS: [&str; 12] = [
    "The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", " and", " runs",
    " away",
];

/// The `n` pieces of a reply, one token each.
pub fn reply_pieces(n: u32) -> Vec<&'static str> {
    (0..n as usize).map(|i| WORDS[i % WORDS.len()]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_pieces_are_one_token_each() {
        let pieces = reply_pieces(30);
        assert_eq!(crate::tokens::count(&pieces.concat()), 30);
    }
}

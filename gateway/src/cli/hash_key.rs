//! `spillway hash-key`: a consumer key's SHA-256 for `key_sha256`, read on stdin (never
//! echoed).

use super::CliResult;

pub fn run() -> CliResult {
    let mut input = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut input)?;
    // One line as typed or piped: its line ending is not part of the key.
    let key = input
        .strip_suffix('\n')
        .map(|k| k.strip_suffix('\r').unwrap_or(k))
        .unwrap_or(&input);
    if key.trim().is_empty() {
        return Err("no key on stdin (e.g. `printf %s \"$KEY\" | spillway hash-key`)".into());
    }
    println!("{}", crate::auth::consumers::key_sha256_hex(key));
    Ok(())
}

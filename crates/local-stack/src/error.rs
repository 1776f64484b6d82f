//! The one way errors are written for people: an error and its causes on one line, as the
//! commands, the status messages and the warm summary print them.

/// An error and its sources, on one line.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // `#[error(transparent)]` and wrappers that repeat their source add nothing.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::chain;
    use std::io;

    #[derive(Debug, thiserror::Error)]
    enum Wrapper {
        #[error("reading state.json")]
        Adds(#[source] io::Error),
        #[error("permission denied")]
        Repeats(#[source] io::Error),
    }

    #[test]
    fn one_line_with_every_cause_said_once() {
        let denied = || io::Error::other("permission denied");
        assert_eq!(
            chain(&Wrapper::Adds(denied())),
            "reading state.json: permission denied"
        );
        assert_eq!(chain(&Wrapper::Repeats(denied())), "permission denied");
    }
}

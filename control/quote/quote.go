// Package quote keeps user input in messages short: at most MaxInput characters of it.
package quote

import (
	"regexp"
	"strconv"
	"unicode/utf8"
)

// MaxInput is how many characters of an offending input a message quotes.
const MaxInput = 80

// Input quotes s as %q does, cut to its first MaxInput characters; a cut
// input ends in "..." and the message says how long it was.
func Input(s string) string {
	cut, rest := clip(s)
	if rest == 0 {
		return strconv.Quote(s)
	}
	return strconv.Quote(cut+"...") + " (" + strconv.Itoa(len(s)) + " bytes)"
}

// clip returns s's first MaxInput characters and how many bytes it left out.
func clip(s string) (string, int) {
	if utf8.RuneCountInString(s) <= MaxInput {
		return s, 0
	}
	i, n := 0, 0
	for i = range s {
		if n == MaxInput {
			break
		}
		n++
	}
	return s[:i], len(s) - i
}

// longInput matches a string as strconv.Quote (and %q) writes it, or a run
// of more than MaxInput characters without a space or quote.
var longInput = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|[^\s"]{` + strconv.Itoa(MaxInput+1) + `,}`)

// Message shortens a message for one line: every quoted string in it (ctd
// quotes offending input with %q, and so do cobra and pflag) is cut as Input
// cuts it, and so is every run of more than MaxInput characters without a
// space (input echoed unquoted, e.g. "unknown flag: --...").
func Message(msg string) string {
	return longInput.ReplaceAllStringFunc(msg, func(m string) string {
		if m[0] != '"' {
			cut, _ := clip(m)
			return cut + "... (" + strconv.Itoa(len(m)) + " bytes)"
		}
		s, err := strconv.Unquote(m)
		if err != nil {
			return m
		}
		return Input(s)
	})
}

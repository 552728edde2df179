package ifnames

import "testing"

func TestName(t *testing.T) {
	c := New()
	if got := c.Name(1); got != "lo" {
		t.Errorf("Name(1) = %q, want lo", got)
	}
	// No interface has index 2^31-1: the number stands in.
	if got := c.Name(1<<31 - 1); got != "2147483647" {
		t.Errorf("Name(2147483647) = %q, want the number", got)
	}
}

"""Static checks of the deploy/ files."""

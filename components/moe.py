"""Mixture-of-Experts layers (issue 6): written with the upcycle stage."""

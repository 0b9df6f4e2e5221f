"""Soft expert merging (survey: Soft, Expert Merging): expert parameters averaged with the gate's weights."""

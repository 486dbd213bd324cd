"""Headless Debian Chromium driven by Playwright (fixture: ``browser``)."""

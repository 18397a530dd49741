"""The built-in suite: tiny OPT models trained offline on a seeded synthetic world (`build.build`)."""

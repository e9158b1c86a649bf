from playwright.sync_api import Page, expect

pytestmark = __import__("pytest").mark.browser


def test_landing_page_shows_the_gallery_status(page: Page, gallery):
    page.goto("/")
    expect(page.get_by_test_id("status-card")).to_be_visible()
    expect(page.get_by_test_id("database-status")).to_contain_text("ready")
